"""Shared pieces of experiment configs: the `tiny` argument and the config skeleton."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mmjax.models import get_preset
from mmjax.models.family import ACT_PATTERN, PRUNE_PATTERN, QUANT_PATTERN

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
      except ValueError as e:  # a type's own message is unreadable; a parser's is kept
        why = (f"is not a valid {values[key].__name__}" if values[key] in (int, float, str)
               else str(e).rstrip("."))
        raise ValueError(f"config argument {key}={val!r} {why}.") from None
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
                num_threads=2, prefetch=4, download=False, train_split="train",
                eval_split="test",
                # {modality or "label": feature}: for a TFDS dataset whose features mmjax
                # cannot tell apart by type (mmjax/data/adapters.py)
                features=config_dict.placeholder(dict),
                # sizes used only if the run has to prepare the dataset itself
                num_train=512 if tiny else 20_000, num_test=256 if tiny else 2_000)
  model = get_preset("tiny" if tiny else "small", modalities=modalities).to_dict()
  model["towers"] = {k: {**v, "image_size": list(v["image_size"])} if "image_size" in v else v
                     for k, v in model["towers"].items()}
  c.model_module = "mmjax.models.family"  # a model module (the contract: mmjax/harness/family.py)
  c.model = model                         # that module's arguments
  c.task_module = "mmjax.tasks.classification"
  c.task = dict(token_mask=config_dict.placeholder(str), label_smoothing=0.0)
  c.optimizer = dict(name="adamw", lr=2e-3 if tiny else 5e-4, schedule="warmup_cosine",
                     warmup_steps=5 if tiny else 100, end_lr_factor=0.0, weight_decay=1e-4,
                     clip_norm=1.0, b1=0.9, b2=0.999,
                     # a regex of the parameters to train (a linear probe: "head/.*");
                     # None trains all
                     trainable=config_dict.placeholder(str))
  c.train = dict(steps=30 if tiny else 3000, log_every=5 if tiny else 50,
                 eval_every=30 if tiny else 500, checkpoint_every=10 if tiny else 500,
                 keep_checkpoints=2, async_checkpoints=True,
                 # >0: at the end, one forward of this batch, compressed and dense: FLOPs
                 # and wall time in summary.json (mmjax/harness/forward_cost.py)
                 measure_forward=0)
  c.mesh = dict(data=-1, fsdp=False)
  c.init = config_dict.placeholder(str)
  c.compress = ml_collections.ConfigDict()
  # examples of the training split that calibrating methods see (first of a shuffle by seed)
  c.calibration = dict(examples=128, seed=0)
  return c


DENSE_WORKDIR = "workdirs/dense"


# ---- compression sections: every setting of the method written out with its default (the
# method's registered dataclass, mmjax/methods/): a flag can only override a field the
# config has, so --config.compress.<section>.<field>=v works for every setting.

def section(method: str, **kw) -> dict:
  """config.compress.<section> for `method`: its defaults updated by `kw` (a setting the
  method does not have is an error); None defaults become typed placeholders."""
  import dataclasses
  import typing

  from mmjax.methods import registry
  entry = registry.lookup(method, "config section")
  hints = typing.get_type_hints(entry.settings)
  out = {"method": method}
  for f in dataclasses.fields(entry.settings):
    value = kw.pop(f.name, f.default)
    if dataclasses.is_dataclass(f.default):  # a nested settings record (a pruning Ramp)
      value = {**dataclasses.asdict(f.default), **dict(value if isinstance(value, dict) else
                                                        dataclasses.asdict(value))}
    elif value is None:
      kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
      kind = ml_collections.ConfigDict if kinds[0] is dict else kinds[0]
      value = config_dict.placeholder(kind)
    out[f.name] = value
  if kw:
    raise ValueError(f"method {method!r} has no setting(s) {sorted(kw)}; it has "
                     f"{sorted(out)}.")
  return out


def prune(method="magnitude", **kw) -> dict:
  if method in ("magnitude", "random", "n_m"):
    kw.setdefault("pattern", PRUNE_PATTERN)
  return section(method, **kw)


def quant(**kw) -> dict:
  return section("fake_quant", **{"pattern": QUANT_PATTERN, **kw})


def activations(**kw) -> dict:
  """percentile: None clips at max|x| (a typed placeholder: a flag can set a float)."""
  return section("activations", **{"pattern": ACT_PATTERN, **kw})


def post_training(method="gptq", **kw) -> dict:
  return section(method, **{"pattern": PRUNE_PATTERN, **kw})


def distill(**kw) -> dict:
  """teacher_model: None reads the teacher's model from its run's config.json."""
  return section("distill", **{"teacher": DENSE_WORKDIR, **kw})


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
