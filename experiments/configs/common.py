"""Shared pieces of experiment configs: the `tiny` argument and the config skeleton."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mmjax.compress_config import ACT_PATTERN, PRUNE_PATTERN, QUANT_PATTERN
from mmjax.models import get_preset

ARGS = ("tiny",)


def parse_arg(arg, valid=ARGS, values=None) -> dict:
  """'tiny,sparsity=0.75' -> {'tiny': True, 'sparsity': 0.75}.

  `valid` are bare words, `values` maps key -> type for key=value pairs; anything else is
  an error listing what is valid."""
  values = values or {}
  out = {}
  for w in (arg or "").split(","):
    if not w:
      continue
    key, eq, val = w.partition("=")
    if eq and key in values:
      try:
        out[key] = values[key](val)
      except ValueError:
        raise ValueError(f"config argument {key}={val!r} is not a valid "
                         f"{values[key].__name__}.") from None
    elif not eq and key in valid:
      out[key] = True
    else:
      pairs = f" and {[k + '=<value>' for k in values]}" if values else ""
      raise ValueError(f"unknown config argument {w!r}; valid: {list(valid)}{pairs} "
                       "(e.g. --config=experiments/configs/dense.py:tiny).")
  return out


def base_config(*, tiny: bool, modalities=None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(dataset="mm_arith/procedural", data_dir=config_dict.placeholder(str),
                batch_size=16 if tiny else 64, text_len=48, audio_samples=8000,
                num_threads=2, prefetch=4, download=False,
                # sizes used only if the run has to prepare the dataset itself
                num_train=512 if tiny else 20_000, num_test=256 if tiny else 2_000)
  model = get_preset("tiny" if tiny else "small", modalities=modalities).to_dict()
  model["towers"] = {k: {**v, "image_size": list(v["image_size"])} if "image_size" in v else v
                     for k, v in model["towers"].items()}
  c.model = model
  c.optimizer = dict(name="adamw", lr=2e-3 if tiny else 5e-4, schedule="warmup_cosine",
                     warmup_steps=5 if tiny else 100, end_lr_factor=0.0, weight_decay=1e-4,
                     clip_norm=1.0, b1=0.9, b2=0.999)
  c.train = dict(steps=30 if tiny else 3000, log_every=5 if tiny else 50,
                 eval_every=30 if tiny else 500, checkpoint_every=10 if tiny else 500,
                 keep_checkpoints=2, async_checkpoints=True)
  c.mesh = dict(data=-1, fsdp=False)
  c.init = config_dict.placeholder(str)
  c.compress = ml_collections.ConfigDict()
  # examples of the training split that calibrating methods see (first of a shuffle by seed)
  c.calibration = dict(examples=128, seed=0)
  return c


DENSE_WORKDIR = "workdirs/dense"


# ---- compression sections, every field written out with the code's default
# (mmjax/compress_config.py, pruning.Schedule): a flag can only override a field the config
# has, so --config.compress.<section>.<field>=v works for every documented field.

def schedule(**kw) -> dict:
  return {**dict(kind="one_shot", begin=0, end=0, every=100, power=3.0, initial=0.0), **kw}


def prune(**kw) -> dict:
  return {**dict(method="magnitude", scope="layer", sparsity=0.5, rules=(),
                 pattern=PRUNE_PATTERN, n=2, m=4), **kw,
          "schedule": schedule(**kw.get("schedule", {}))}


def quant(**kw) -> dict:
  return {**dict(bits=8, granularity="channel", clip_ratio=1.0, pattern=QUANT_PATTERN), **kw}


def activations(**kw) -> dict:
  """percentile: None clips at max|x|; a typed placeholder so that a flag can set a float."""
  out = {**dict(bits=8, mode="fake", int8_grads=True, format="int", percentile=None,
                pattern=ACT_PATTERN), **kw}
  out["percentile"] = config_dict.FieldReference(out["percentile"], field_type=float)
  return out


def post_training(**kw) -> dict:
  """Every field of config.compress.post_training (mmjax/compress_config.py)."""
  return {**dict(method="gptq", format="int", bits=4, symmetric=True, granularity="group",
                 group_size=128, ragged_groups=False, sparsity=0.5, n=0, m=0, joint_quant=False, damp=0.01,
                 block=128, act_order=False, mode="sequential", alpha=0.5, act_mode="fake",
                 n_grid=20, pattern=PRUNE_PATTERN, rules=()), **kw}


def distill(**kw) -> dict:
  """teacher_model: None reads the teacher's model from its run's config.json."""
  return {**dict(teacher=DENSE_WORKDIR, temperature=2.0, alpha=0.5, features=(),
                 feature_weight=0.0,
                 teacher_model=config_dict.placeholder(ml_collections.ConfigDict)), **kw}


def finetune_config(args: dict, steps: int = 1000) -> ml_collections.ConfigDict:
  """A compression run: starts from the dense run's checkpoint (config.init) and fine-tunes
  on a fresh short warmup-cosine schedule (peak 5e-4, 100 warmup steps). Tests pass
  --config.init=<a tiny dense run>."""
  tiny = bool(args.get("tiny"))
  c = base_config(tiny=tiny)
  c.init = DENSE_WORKDIR
  c.optimizer.lr = 5e-4
  c.optimizer.warmup_steps = 5 if tiny else 100
  if not tiny:
    c.train.steps = steps
  c.compress.export = True  # write <workdir>/export (real codes, packed masks) at the end
  return c
