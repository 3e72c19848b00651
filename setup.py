"""mmjax: compression experiments on multimodal transformers in JAX/Flax.

Version ranges here stay loose so mmjax installs next to other packages;
`constraints.txt` pins the exact versions the test suite passed with, and
`launch.sh` installs with it.
"""
from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="Compression experiments (pruning, quantization, distillation) "
    "on multimodal transformer models in JAX/Flax.",
    packages=find_packages(include=["mmjax", "mmjax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.8",
        "absl-py>=2.1",
        "ml-collections>=0.1.1",
        "grain>=0.2.10",
        "array-record>=0.7",
        "pillow>=10",
        # tensorflow-datasets imports it without declaring it.
        "importlib_resources>=6",
        "matplotlib>=3.8",
        "numpy>=1.26",
        # mm_arith/real: its bundled handwritten digit scans (no download).
        "scikit-learn>=1.3",
        # TensorBoard event files without TensorFlow.
        "tensorboardX>=2.6",
        # jax.export's serialization (deployable artifacts, python -m mmjax.cli.deploy).
        "flatbuffers>=24",
        # Hugging Face checkpoints of the pretrained families (mmjax.pretrained).
        "safetensors>=0.4",
        # The checkpoints' own tokenizers: tokenizer.json (CLIP, BERT) and SentencePiece
        # .model files (SigLIP, big_vision) (mmjax.pretrained.text_tokenizer).
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        # python -m mmjax.pretrained.fetch: a checkpoint from the Hub, on request only.
        "huggingface_hub>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        # Optional: only tf.data and some TFDS builders need TensorFlow.
        "tf": ["tensorflow-cpu>=2.16"],
        # Benchmarks only: the PyTorch twin of bench/train_step.py --vs_torch (CPU wheel), and
        # Qwix, the peer that bench/post_training.py --qwix compares GPTQ against.
        "bench": ["torch==2.13.0", "qwix==0.1.8"],
        # tests/golden/make_golden.py: the reference models the golden files come from.
        "golden": ["torch==2.13.0", "transformers>=4.50,<5"],
    },
)
