"""Whisper's audio encoder (Radford et al. 2022) in the layout of Hugging Face's
`WhisperModel` / `WhisperForConditionalGeneration` (the decoder's tensors are left
aside): two 1-D convolutions over time (the second with stride 2) with GELU, position
embeddings, pre-LN blocks (the key projection without bias), a final LayerNorm. A model
module (`config.model_module = "mmjax.pretrained.whisper"`):

    config.model = dict(variant="base", num_classes=12)   # tiny base small medium large
    config.init = "/path/to/model.safetensors"

The input is `batch["mel"]`, log-mel features `[batch, frames, n_mels]` (Whisper's own
are 3000 frames of 80 or 128 bins: 30 s; shorter clips run on the first positions), or
with `input="audio"`, `batch["audio"]`, 16 kHz audio `[batch, samples]` turned into them
inside the forward by `whisper_features.log_mel`, as Whisper's feature extractor does.
`apply` returns (logits of a linear head on the mean-pooled encoder states, or with
`num_classes=0` those pooled states; intermediates: each block, the final states).
"""
from __future__ import annotations

import flax.linen as nn
import numpy as np

from mmjax.harness.family import Family
from mmjax.pretrained import checkpoint_files, model_args, whisper_features
from mmjax.pretrained.checkpoint_files import Tensor
from mmjax.pretrained.clip import _linear
from mmjax.pretrained.encoder import encode

SIZES = {"tiny": (384, 4, 6, 1536), "base": (512, 6, 8, 2048), "small": (768, 12, 12, 3072),
         "medium": (1024, 24, 16, 4096), "large": (1280, 32, 20, 5120)}
ARGS = {"variant": "base", "width": None, "depth": None, "heads": None, "mlp_dim": None,
        "n_mels": 80, "max_positions": 1500, "num_classes": 0, "eps": 1e-5,
        "input": "mel", "attention_impl": None}
INPUTS = ("mel", "audio")  # log-mel features, or 16 kHz audio (whisper_features.log_mel)
MATMULS = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc1|fc2))/kernel"


def resolve(args: dict) -> dict:
  a = model_args.merge(args, ARGS, "mmjax.pretrained.whisper")
  if a["variant"]:
    sizes, _ = model_args.variant(a["variant"], SIZES, ", ".join(SIZES), patched=False)
    model_args.fill(a, dict(zip(model_args.TOWER, sizes)))
  model_args.require(a, model_args.TOWER, "base")
  model_args.check_tower({k: a[k] for k in model_args.TOWER}, "config.model")
  if a["input"] not in INPUTS:
    raise ValueError(f"config.model.input={a['input']!r} is unknown; valid: "
                     f"{', '.join(INPUTS)}.")
  return a


class WhisperEncoder(nn.Module):
  cfg: dict

  @nn.compact
  def __call__(self, batch, rng=None):
    c = self.cfg
    mel = (whisper_features.log_mel(batch["audio"], c["n_mels"]) if c["input"] == "audio"
           else batch["mel"])
    if mel.ndim != 3 or mel.shape[-1] != c["n_mels"]:
      raise ValueError(f"Whisper's encoder expects log-mel features [batch, frames, "
                       f"{c['n_mels']}], got {tuple(mel.shape)}.")
    gelu = lambda x: nn.gelu(x, approximate=False)
    x = gelu(nn.Conv(c["width"], (3,), padding=((1, 1),), name="conv1")(mel))
    x = gelu(nn.Conv(c["width"], (3,), strides=2, padding=((1, 1),), name="conv2")(x))
    if x.shape[1] > c["max_positions"]:
      raise ValueError(f"{mel.shape[1]} frames give {x.shape[1]} positions, more than the "
                       f"{c['max_positions']} of this Whisper encoder (30 s for the released "
                       "ones); give shorter clips.")
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02),
                       (c["max_positions"], c["width"]))[:x.shape[1]]
    inter = {}
    x = encode(x, None, c["depth"], dict(num_heads=c["heads"], mlp_dim=c["mlp_dim"],
                                         eps=c["eps"], key_bias=False,
                                         implementation=c["attention_impl"]), inter)
    x = inter["final"] = nn.LayerNorm(c["eps"], name="norm")(x)
    pooled = inter["pooled"] = x.mean(axis=1)
    if not c["num_classes"]:
      return pooled, inter
    return nn.Dense(c["num_classes"], name="head")(pooled), inter


# ------------------------------------------------------------------ Hugging Face names

def hf_spec(a: dict, prefix: str) -> list:
  e = f"{prefix}encoder."
  conv = lambda w: np.ascontiguousarray(w.transpose(2, 1, 0))  # [out, in, k] -> [k, in, out]
  spec = [Tensor(f"{e}conv1.weight", "conv1/kernel", conv), Tensor(f"{e}conv1.bias", "conv1/bias"),
          Tensor(f"{e}conv2.weight", "conv2/kernel", conv), Tensor(f"{e}conv2.bias", "conv2/bias"),
          Tensor(f"{e}embed_positions.weight", "pos_embedding"),
          Tensor(f"{e}layer_norm.weight", "norm/scale"), Tensor(f"{e}layer_norm.bias", "norm/bias")]
  parts = {"self_attn.q_proj": "attn/query", "self_attn.v_proj": "attn/value",
           "self_attn.out_proj": "attn/out", "fc1": "mlp/fc1", "fc2": "mlp/fc2"}
  norms = {"self_attn_layer_norm": "ln_attn", "final_layer_norm": "ln_mlp"}
  for i in range(a["depth"]):
    s, d = f"{e}layers.{i}.", f"block_{i:02d}/"
    spec.append(Tensor(f"{s}self_attn.k_proj.weight", f"{d}attn/key/kernel", _linear))
    for k, v in parts.items():
      spec += [Tensor(f"{s}{k}.weight", f"{d}{v}/kernel", _linear),
               Tensor(f"{s}{k}.bias", f"{d}{v}/bias")]
    for k, v in norms.items():
      spec += [Tensor(f"{s}{k}.weight", f"{d}{v}/scale"), Tensor(f"{s}{k}.bias", f"{d}{v}/bias")]
  return spec


def load(path: str, abstract, args: dict):
  """A Hugging Face Whisper checkpoint's encoder -> params shaped like `abstract` (a
  classification head, absent from Whisper's checkpoints, starts at zero)."""
  checkpoint_files.check_format(path, "mmjax.pretrained.whisper")
  tensors = checkpoint_files.read_safetensors(path)
  prefix = "model." if any(k.startswith("model.encoder.") for k in tensors) else ""
  return checkpoint_files.to_params(tensors, hf_spec(args, prefix), abstract,
                                    f"Whisper checkpoint {path}", new=("head/",),
                                    ignore=(rf"{prefix}decoder\..*", r"proj_out\..*"))


def family(args: dict) -> Family:
  a = resolve(args)
  model = WhisperEncoder(a)

  def example_batch(batch_size, data=None, seed=0, with_labels=True):
    rng = np.random.default_rng(seed)
    frames = 2 * a["max_positions"]  # Whisper's input: always 30 s (3000 frames)
    if a["input"] == "audio":  # the input pipeline's clip length when a run gives one
      samples = getattr(data, "audio_samples", None) or 160 * frames
      out = {"audio": (0.1 * rng.normal(size=(batch_size, samples))).astype(np.float32)}
    else:
      out = {"mel": rng.normal(size=(batch_size, frames, a["n_mels"])).astype(np.float32)}
    if with_labels and a["num_classes"]:
      out["label"] = rng.integers(0, a["num_classes"], batch_size).astype(np.int32)
    return out

  def preprocess(data):
    """The generic audio preprocessing (16 kHz, cropped or padded to the clip length),
    after checking that clip length fits the encoder's positions, at config time."""
    if a["input"] == "audio":
      positions = (data.audio_samples // whisper_features.HOP + 1) // 2
      if positions > a["max_positions"]:
        most = 2 * a["max_positions"] * whisper_features.HOP - 1
        raise ValueError(f"config.data.audio_samples={data.audio_samples} gives {positions} "
                         f"positions, more than the {a['max_positions']} of this Whisper "
                         f"encoder; use at most {most} samples.")
    return {}

  return Family(
      "mmjax.pretrained.whisper", init=lambda rng, batch: model.init(rng, batch)["params"],
      apply=lambda params, batch, rng=None: model.apply({"params": params}, batch),
      example_batch=example_batch, modalities=(a["input"],),
      patterns={"matmul": MATMULS, "weights": r".*kernel", "activations": MATMULS},
      labels=tuple(str(i) for i in range(a["num_classes"])) or None,
      load=lambda path, abstract: load(path, abstract, a),
      unit_types={"attention": r".*/attn/\w+/kernel", "mlp": r".*/mlp/\w+/kernel",
                  "conv": r"conv\d/kernel"}, preprocess=preprocess, args=a)
