"""A pretrained encoder on a TFDS dataset: dense evaluation, fine-tuning or a linear probe,
and any compression method, by config alone.

  model=       vit | clip | siglip | whisper | bert: sizes from the checkpoint's config.json;
               or a size: vit_b16 vit_b32 vit_l16 clip_b32 clip_b16 clip_l14 siglip_b16
               siglip_so400m14 siglip2_b16 whisper_tiny whisper_base whisper_small bert_base
               bert_large
  checkpoint=  a Hugging Face checkpoint directory (model.safetensors, config.json, the
               tokenizer files, preprocessor_config.json), or the weights file itself
               (.safetensors; big_vision .npz for ViT and SigLIP, with tokenizer=); on
               disk: `python -m mmjax.pretrained.fetch --repo=... --out=...` downloads one
  tokenizer=   the tokenizer's directory or file when it is not in the checkpoint's
  dataset=     a TFDS dataset by name (defaults: cifar10 for the image families,
               speech_commands for Whisper, imdb_reviews for BERT)
  task=        zero_shot (CLIP, SigLIP: the dataset's class names in prompts; the default)
               | retrieval (CLIP, SigLIP: image-text pairs, recall@k)
               | finetune (a new head on the dataset's classes; the default otherwise)
               | probe (a new head, the only thing trained: a linear probe)
  classes=     a text file of class names, one per line (zero-shot; default: the
               dataset's own label names)
  steps=       training steps (default 0: evaluate, and compress and export one-shot)
  method=...   a compression method with post_training.py's arguments (rtn gptq awq
               sparsegpt wanda smoothquant magnitude; bits= group= nm= sparsity= w8a8 ...),
               or qat (bits=, with steps; int8: also int8 inputs, real int8 products) or
               prune (sparsity= or nm=, with steps)
  tiny         small batches and evaluation sizes (tests)

    C=experiments/configs/pretrained.py
    ./launch.sh train --workdir=workdirs/clip_b32_zs \\
      --config=$C:model=clip_b32,checkpoint=/ckpt/clip-vit-base-patch32
    ./launch.sh train --workdir=workdirs/clip_b32_gptq \\
      --config=$C:model=clip_b32,checkpoint=/ckpt/clip-vit-base-patch32,method=gptq,bits=4

Every family compresses its own default kernels (Family.patterns); per-tower sensitivity
(`python -m experiments.sensitivity --workdir=<a run>`) and deploy (`python -m mmjax.cli.deploy`)
take the run's workdir as for any run.
"""
import importlib
import os

from experiments.configs import post_training
from experiments.configs.common import activations, base_config, parse_arg, prune, quant
from mmjax.pretrained import hf_config

FAMILIES = ("vit", "clip", "siglip", "whisper", "bert")
SIZES = {"vit_b16": ("vit", "B/16"), "vit_b32": ("vit", "B/32"), "vit_l16": ("vit", "L/16"),
         "clip_b32": ("clip", "B/32"), "clip_b16": ("clip", "B/16"),
         "clip_l14": ("clip", "L/14"), "siglip_b16": ("siglip", "B/16"),
         "siglip_so400m14": ("siglip", "So400m/14"),
         # SigLIP 2 (standard, not NaFlex): SigLIP's layout, Gemma's 256k vocabulary
         "siglip2_b16": ("siglip", "B/16", {"vocab_size": 256000}),
         "whisper_tiny": ("whisper", "tiny"),
         "whisper_base": ("whisper", "base"), "whisper_small": ("whisper", "small"),
         "bert_base": ("bert", "base"), "bert_large": ("bert", "large")}
DATASETS = {"vit": "cifar10", "clip": "cifar10", "siglip": "cifar10",
            "whisper": "speech_commands", "bert": "imdb_reviews"}
TASKS = ("zero_shot", "retrieval", "finetune", "probe")
TWO_TOWERS = ("clip", "siglip")
WORDS = post_training.WORDS
VALUES = {**post_training.VALUES, "model": str, "checkpoint": str, "tokenizer": str,
          "dataset": str, "task": str, "classes": str, "steps": int}


def _model(name: str):
  """-> (family, variant, fields the variant fixes besides its sizes)."""
  if name in FAMILIES:
    return name, None, {}
  if name in SIZES:
    family, variant, *extra = SIZES[name]
    return family, variant, (extra[0] if extra else {})
  raise ValueError(f"config argument model={name!r} is unknown; valid: {list(FAMILIES)} "
                   f"(sizes from the checkpoint's config.json) or {sorted(SIZES)}.")


def _sizes(family: str, variant, checkpoint: str, fixed: dict) -> dict:
  """The sizes: the checkpoint's config.json when it has one (a named size must agree),
  else the named variant's."""
  found = hf_config.model_args(family, checkpoint)
  if variant is None:
    if not found:
      sizes = sorted(k for k, v in SIZES.items() if v[0] == family)
      raise ValueError(f"checkpoint={checkpoint} has no config.json to read the sizes from; "
                       f"name a size: model= one of {sizes}.")
    return found
  if found:
    module = importlib.import_module(f"mmjax.pretrained.{family}")
    named = module.resolve({"variant": variant, **fixed})
    differ = sorted(k for k, v in found.items() if k in named and k != "variant"
                    and named[k] is not None and v != named[k])
    if differ:
      raise ValueError(f"checkpoint={checkpoint} is not {family} {variant}: its config.json "
                       f"differs in {differ}; use model={family} (sizes from config.json).")
    return found
  return {"variant": variant, **fixed}


def _class_names(args: dict):
  """A file's names, or the dataset's own, read when the run starts (from the prepared
  dataset's info: cifar10's names, for one, exist only once it is prepared)."""
  if not args.get("classes"):
    return "<dataset:label_names>"
  try:
    with open(args["classes"]) as f:
      return [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise ValueError(f"config argument classes={args['classes']}: {e.strerror}; give a "
                     "text file with one class name per line.") from None


def get_config(arg=None):
  args = parse_arg(arg, valid=WORDS, values=VALUES)
  if "model" not in args or "checkpoint" not in args:
    raise ValueError("experiments/configs/pretrained.py needs model=<family or size> and "
                     "checkpoint=<directory or file>, e.g. "
                     "pretrained.py:model=clip_b32,checkpoint=/ckpt/clip-vit-base-patch32.")
  family, variant, fixed = _model(args["model"])
  ckpt = args["checkpoint"]
  if not os.path.exists(ckpt):
    raise ValueError(f"checkpoint={ckpt}: no such file or directory. mmjax never downloads "
                     "implicitly; get one with python -m mmjax.pretrained.fetch "
                     f"--repo=<owner/name> --out={ckpt}")
  task = args.get("task", "zero_shot" if family in TWO_TOWERS else "finetune")
  if task not in TASKS:
    raise ValueError(f"config argument task={task!r} is unknown; valid: {list(TASKS)}.")
  if task in ("zero_shot", "retrieval") and family not in TWO_TOWERS:
    raise ValueError(f"task={task} needs a two-tower model ({', '.join(TWO_TOWERS)}); "
                     f"{family} takes task=finetune or task=probe.")
  if task in ("finetune", "probe") and family in TWO_TOWERS:
    raise ValueError(f"task={task} adds a head, which {family} has none of; train it as a "
                     "zero-shot classifier (task=zero_shot,steps=N: the prompts' logits are "
                     "its head) or contrastively (task=retrieval,steps=N).")
  tiny, steps = bool(args.get("tiny")), int(args.get("steps", 0))
  dataset = args.get("dataset", DATASETS[family])

  c = base_config(tiny=tiny)
  c.model_module = f"mmjax.pretrained.{family}"
  model = _sizes(family, variant, ckpt, fixed)
  tokenizer = args.get("tokenizer") or (hf_config.folder(ckpt) if family in (
      "clip", "siglip", "bert") else None)
  if family in ("clip", "siglip", "bert"):
    model["tokenizer"] = tokenizer
  if family in ("vit", "clip", "siglip"):
    model["processor"] = hf_config.folder(ckpt)
  if task == "zero_shot":
    model["class_names"] = _class_names(args)
  if task in ("finetune", "probe"):
    model["num_classes"] = "<dataset:num_classes>"
    if family in ("vit", "bert"):
      model["new_head"] = True
  if family == "whisper":
    model["input"] = "audio"
    c.data.audio_samples = 16000  # speech_commands' 1 s clips at 16 kHz
  c.model = model
  c.init = hf_config.weights_file(ckpt)
  c.data.dataset = dataset
  if family in ("clip", "bert"):  # tokens per text, at most the model's (SigLIP: always its)
    c.data.text_len = 16 if tiny else (77 if family == "clip" else 128)
  if task == "retrieval":
    c.task_module = "mmjax.tasks.retrieval"
    c.task = dict(outputs=("image", "text"), loss="softmax" if family == "clip" else "sigmoid",
                  temperature=0.07, ks=(1, 5), match_key=None)
  if task == "probe":
    c.optimizer.trainable = "head/.*"
  c.optimizer.lr = 1e-3 if task == "probe" else 1e-4
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(steps // 10, 0))
  c.train.steps = steps
  if steps:  # evaluated at the end; logged and checkpointed ten times on the way
    c.train.log_every = c.train.checkpoint_every = max(steps // (1 if tiny else 10), 1)
    c.train.eval_every = steps
  c.compress.export = True
  if tiny:
    c.calibration.examples = 32
  method = args.get("method")
  if method == "qat":  # with int8: every matmul's inputs too, as real int8 products
    c.compress.quant = quant(bits=args.get("bits", 8), pattern=None)
    if args.get("int8"):
      c.compress.activations = activations(mode="int8", pattern=None)
  elif method == "prune":
    n, m = args.get("nm", (0, 0))
    c.compress.prune = (prune("n_m", n=n, m=m, pattern=None) if m else
                        prune("magnitude", sparsity=args.get("sparsity", 0.5), pattern=None))
  elif method:
    post_training.set_method(c, args, pattern=None, group=32 if tiny else 128)
  return c
