"""`config.compress` -> a `Plan` (and the distillation / activation-quantization settings
the trainer needs), with every error raised at config time.

    config.compress.prune = dict(
        method="magnitude",            # magnitude | random | n_m | heads | mlp_units
        scope="layer",                 # layer | global (one threshold per rule)
        sparsity=0.9,                  # fraction removed, in [0, 1)
        rules=[],                      # [(regex, sparsity), ...]; empty: [(pattern, sparsity)]
        pattern=PRUNE_PATTERN,         # which leaves, when `rules` is empty
        n=2, m=4,                      # for method="n_m"
        schedule=dict(kind="polynomial", begin=0, end=3000, every=100, power=3.0))
    config.compress.quant = dict(bits=8, granularity="channel", clip_ratio=1.0,
                                 pattern=QUANT_PATTERN)
    config.compress.export = True      # write <workdir>/export at the end (see export.py)

Pruning runs before quantization (the quantizer sees the masked weights). Regexes must
match whole parameter paths such as `image/block_00/mlp/fc1/kernel`.
"""
from __future__ import annotations

import json
import os

import jax

from mmjax import checkpointing
from mmjax.compress import distill as distill_lib
from mmjax.compress import pruning, quant, structured
from mmjax.compress.core import IDENTITY, Plan, chain, flatten, match_paths, rules
from mmjax.models import ModelConfig, MultimodalModel, random_inputs

# every Dense kernel of every transformer block (towers and fusion); not embeddings/head
PRUNE_PATTERN = r".*/(attn|cross_attn|mlp)/\w+/kernel"
# every parameter ("int8 everywhere"): matrices per output channel, vectors (biases,
# LayerNorm, position tables' rows) per tensor. In a d=128 model the vectors and position
# tables are 1.4% of the weights but would be 5% of an int8 export left in fp32.
QUANT_PATTERN = r".*"

PRUNE_KEYS = {"method", "scope", "sparsity", "rules", "pattern", "n", "m", "schedule"}
QUANT_KEYS = {"bits", "granularity", "clip_ratio", "pattern"}
SCHEDULE_KEYS = {"kind", "begin", "end", "every", "power", "initial"}


def _as_dict(c):
  return c.to_dict() if hasattr(c, "to_dict") else dict(c or {})


def _check_keys(d, valid, where):
  bad = sorted(set(d) - valid)
  if bad:
    raise ValueError(f"{where} has unknown field(s) {bad}; valid fields: {sorted(valid)}.")


def _prune_transform(p: dict, shapes: dict, num_heads: int):
  _check_keys(p, PRUNE_KEYS, "config.compress.prune")
  method = p.get("method", "magnitude")
  paths = list(shapes)
  if method in ("heads", "mlp_units"):
    unit = "head" if method == "heads" else "mlp"
    pattern = p.get("pattern") or (structured.HEAD_PATTERN if unit == "head"
                                   else structured.MLP_PATTERN)
    hits = match_paths(pattern, sorted(paths), "config.compress.prune.pattern")
    structured.check_structured(p.get("sparsity", 0.5), unit, {h: shapes[h] for h in hits},
                                num_heads)
    sched = _as_dict(p.get("schedule"))
    _check_keys(sched, SCHEDULE_KEYS, "config.compress.prune.schedule")
    schedule = pruning.Schedule(**sched).validate("config.compress.prune.schedule")
    return rules([(pattern, structured.units(p.get("sparsity", 0.5), unit,
                                             num_heads=num_heads, schedule=schedule))], paths)
  if method == "n_m":
    n, m = int(p.get("n", 2)), int(p.get("m", 4))
    pattern = p.get("pattern", PRUNE_PATTERN)
    hits = match_paths(pattern, sorted(paths), "config.compress.prune.pattern")
    try:
      t = pruning.n_of_m(n, m, begin=int(_as_dict(p.get("schedule")).get("begin", 0)),
                         shapes={h: shapes[h] for h in hits})
    except ValueError as e:
      raise ValueError(f"config.compress.prune (n={n}, m={m}): {e}") from None
    return rules([(pattern, t)], paths)
  if method not in ("magnitude", "random"):
    raise ValueError(f"config.compress.prune.method={method!r} is unknown; valid: "
                     "magnitude, random, n_m, heads, mlp_units.")
  sched = _as_dict(p.get("schedule"))
  _check_keys(sched, SCHEDULE_KEYS, "config.compress.prune.schedule")
  try:
    schedule = pruning.Schedule(**sched).validate("config.compress.prune.schedule")
  except TypeError as e:
    raise ValueError(f"config.compress.prune.schedule: {e}") from None
  scope = p.get("scope", "layer")
  pairs = [tuple(r) for r in (p.get("rules") or [])]
  where = [f"config.compress.prune.rules[{i}] ({r[0]!r}) sparsity" for i, r in enumerate(pairs)]
  if not pairs:
    pairs = [(p.get("pattern", PRUNE_PATTERN), p.get("sparsity", 0.5))]
    where = ["config.compress.prune.sparsity"]
  built = []
  for (pattern, s), w in zip(pairs, where):
    s = pruning.check_sparsity(s, w)
    built.append((pattern, pruning.unstructured(s, score=method, scope=scope,
                                                schedule=schedule)))
  return rules(built, paths)


def _quant_transform(q: dict, shapes: dict):
  _check_keys(q, QUANT_KEYS, "config.compress.quant")
  bits = q.get("bits", 8)
  quant.check_bits(bits, "config.compress.quant.bits")
  t = quant.weights(bits, q.get("granularity", "channel"), float(q.get("clip_ratio", 1.0)))
  return rules([(q.get("pattern", QUANT_PATTERN), t)], list(shapes))


def build_plan(compress_cfg, shapes: dict, num_heads: int = 1) -> Plan:
  """`shapes`: {path: shape} of the model's parameters (`param_shapes(model_cfg)`);
  `num_heads`: the model's, for head pruning."""
  c = _as_dict(compress_cfg)
  # distill and activations are read by the trainer (a teacher checkpoint, calibration
  # batches): they act on the forward pass, not on the parameter tree
  _check_keys(c, {"prune", "quant", "export", "distill", "activations"}, "config.compress")
  parts = []
  if c.get("prune"):
    parts.append(_prune_transform(_as_dict(c["prune"]), shapes, num_heads))
  if c.get("quant"):
    parts.append(_quant_transform(_as_dict(c["quant"]), shapes))
  if not parts:
    return Plan(IDENTITY)
  return Plan(parts[0] if len(parts) == 1 else chain(*parts))


# ---------------------------------------------------------------- forward-pass settings
# distillation and activation quantization act on the forward pass, not the parameter tree;
# the trainer reads them, with every check done here, before anything is compiled

DISTILL_KEYS = {"teacher", "teacher_model", "temperature", "alpha", "features",
                "feature_weight"}


def distill_settings(config, d):
  """config.compress.distill -> (Distill, teacher checkpoint dir), every check done here:
  the teacher checkpoint exists and fits the teacher's model config."""
  d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
  bad = sorted(set(d) - DISTILL_KEYS)
  if bad:
    raise ValueError(f"config.compress.distill has unknown field(s) {bad}; valid fields: "
                     f"{sorted(DISTILL_KEYS)}.")
  teacher = d.get("teacher") or ""
  if teacher == "init":  # self-distillation: the checkpoint the student starts from
    teacher = config.get("init") or ""
  if not teacher:
    raise ValueError("config.compress.distill.teacher is not set: give a trained run's "
                     "workdir, or 'init' to distil from config.init (self-distillation).")
  run_dir = os.path.normpath(teacher)
  if os.path.basename(run_dir) == "checkpoints":  # a run's checkpoints dir: its workdir is up
    run_dir = os.path.dirname(run_dir)
  if d.get("teacher_model"):
    model_dict = d["teacher_model"]
  else:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
      raise ValueError(f"config.compress.distill.teacher={teacher}: no config.json there to "
                       "read the teacher's model from; point at a run's workdir or set "
                       "config.compress.distill.teacher_model.")
    with open(path) as f:
      model_dict = json.load(f)["model"]
  teacher_cfg = ModelConfig.from_dict(model_dict)
  reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(teacher), read_only=True)
  step = reader.latest_step()
  if step is None:
    raise ValueError(f"config.compress.distill.teacher={teacher} holds no checkpoint; point "
                     "it at a trained run's workdir.")
  teacher_model = MultimodalModel(teacher_cfg)
  reader.check_params_fit(step, abstract_params(teacher_cfg),
                          what="the teacher (config.compress.distill.teacher): params in")
  reader.close()
  features = tuple(d.get("features") or ())
  dist = distill_lib.Distill(teacher_model, float(d.get("temperature", 2.0)),
                             float(d.get("alpha", 0.5)), features,
                             float(d.get("feature_weight", 0.0))).validate()
  return dist, teacher


ACTIVATION_KEYS = {"bits", "mode", "int8_grads", "calibration_batches", "percentile"}


def activation_settings(a) -> dict:
  a = a.to_dict() if hasattr(a, "to_dict") else dict(a)
  bad = sorted(set(a) - ACTIVATION_KEYS)
  if bad:
    raise ValueError(f"config.compress.activations has unknown field(s) {bad}; valid "
                     f"fields: {sorted(ACTIVATION_KEYS)}.")
  out = dict(bits=quant.check_bits(a.get("bits", 8), "config.compress.activations.bits"),
             mode=a.get("mode", "fake"), calibration_batches=int(a.get("calibration_batches", 8)),
             percentile=a.get("percentile"), int8_grads=bool(a.get("int8_grads", True)))
  if out["mode"] not in ("fake", "int8"):
    raise ValueError(f"config.compress.activations.mode={out['mode']!r} is unknown; valid: "
                     "fake (fake-quant inputs), int8 (real int8 x int8 -> int32 matmuls).")
  if out["mode"] == "int8" and out["bits"] != 8:
    raise ValueError("config.compress.activations.mode='int8' needs bits=8.")
  if out["calibration_batches"] < 1:
    raise ValueError("config.compress.activations.calibration_batches must be >= 1.")
  p = out["percentile"]
  if p is not None and not 50.0 <= float(p) <= 100.0:
    raise ValueError(f"config.compress.activations.percentile={p} must be in [50, 100].")
  return out


def abstract_params(model_cfg: ModelConfig):
  """The model's parameter tree as ShapeDtypeStructs (traced, nothing allocated)."""
  model = MultimodalModel(model_cfg)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           random_inputs(model_cfg, 1))["params"])


def param_shapes(model_cfg: ModelConfig) -> dict:
  """{path: shape} of the model's parameters, traced (nothing allocated)."""
  return {p: tuple(a.shape) for p, a in flatten(abstract_params(model_cfg)).items()}
