"""`config.compress` -> a compression `Plan` for mmjax's models, and what the trainer must
hand it (frozen inputs such as a teacher, calibration batches), every error raised at
config time, before anything is compiled or written.

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
    config.compress.activations = dict(bits=8, mode="fake", int8_grads=True, format="int",
                                       percentile=None, pattern=ACT_PATTERN)
    config.compress.post_training = dict(
        method="gptq",                 # rtn | gptq | awq | sparsegpt | wanda | smoothquant
        format="int", bits=4, symmetric=True,   # int (2..8 bits) | fp8_e4m3 | fp8_e5m2 | nf4
        granularity="group", group_size=128,    # tensor | channel | group
        ragged_groups=False,           # True: a shorter last group where group_size does not
                                       # divide a kernel's inputs (else an error)
        sparsity=0.5, n=0, m=0,        # sparsegpt / wanda: unstructured, or N:M when m > 0
        joint_quant=False,             # sparsegpt: also round the kept weights to the grid
        damp=0.01, block=128, act_order=False,  # gptq / sparsegpt
        mode="sequential",             # sequential | parallel (statistics from the dense model)
        alpha=0.5, act_mode="fake",    # smoothquant: migration strength, fake | int8
        n_grid=20,                     # awq: exponents searched in [0, 1]
        pattern=PRUNE_PATTERN,
        rules=[])                      # [(regex, {field: value}), ...]: per-layer settings
    config.calibration = dict(examples=128, seed=0)  # from the training split
    config.compress.distill = dict(teacher=<workdir> or "init", temperature=2.0, alpha=0.5,
                                   features=(), feature_weight=0.0, teacher_model=None)
    config.compress.export = True      # write <workdir>/export at the end (compress_finish)

The plan is, in order: pruning (the quantizer sees the masked weights), weight
quantization, activation quantization, distillation. Regexes must match whole parameter
paths such as `image/block_00/mlp/fc1/kernel`. This module is mmjax's client of
`mmjax.compress`: it knows the models (patterns, the unit layouts of structured pruning,
the teacher's architecture) and the checkpoints; the compress package knows neither.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from mmjax import checkpointing
from mmjax.compress import Plan, activations, distill, flatten, formats, match_paths, pruning
from mmjax.compress import quant, rules, structured
from mmjax.compress.post_training import awq, gptq, rtn, smoothquant, sparsegpt, wanda
from mmjax.models import ModelConfig, MultimodalModel, random_inputs, structure

# every Dense kernel of every transformer block (towers and fusion); not embeddings/head
PRUNE_PATTERN = r".*/(attn|cross_attn|mlp)/\w+/kernel"
# every parameter ("int8 everywhere"): matrices per output channel, vectors (biases,
# LayerNorm, position tables' rows) per tensor. In a d=128 model the vectors and position
# tables are 1.4% of the weights but would be 5% of an int8 export left in fp32.
QUANT_PATTERN = r".*"
# every matmul weight (the Dense layers of blocks, fusion and head); the patch embeddings
# are convolutions, whose inputs stay float
ACT_PATTERN = r"(?!(image|audio)/patch_embed/).*/kernel"

PT_KEYS = {"method", "format", "bits", "symmetric", "granularity", "group_size",
           "ragged_groups", "sparsity",
           "n", "m", "joint_quant", "damp", "block", "act_order", "mode", "alpha", "act_mode",
           "n_grid", "pattern", "rules"}
PT_METHODS = ("rtn", "gptq", "awq", "sparsegpt", "wanda", "smoothquant")
PRUNE_KEYS = {"method", "scope", "sparsity", "rules", "pattern", "n", "m", "schedule"}
QUANT_KEYS = {"bits", "granularity", "clip_ratio", "pattern"}
SCHEDULE_KEYS = {"kind", "begin", "end", "every", "power", "initial"}
ACTIVATION_KEYS = {"bits", "mode", "int8_grads", "format", "percentile", "pattern"}
CALIBRATION_KEYS = {"examples", "seed"}
DISTILL_KEYS = {"teacher", "teacher_model", "temperature", "alpha", "features",
                "feature_weight"}
COMPRESS_KEYS = {"prune", "quant", "export", "distill", "activations", "post_training"}


def _as_dict(c):
  return c.to_dict() if hasattr(c, "to_dict") else dict(c or {})


def _check_keys(d, valid, where):
  bad = sorted(set(d) - valid)
  if bad:
    raise ValueError(f"{where} has unknown field(s) {bad}; valid fields: {sorted(valid)}.")


def _schedule(p):
  sched = _as_dict(p.get("schedule"))
  _check_keys(sched, SCHEDULE_KEYS, "config.compress.prune.schedule")
  try:
    return pruning.Schedule(**sched).validate("config.compress.prune.schedule")
  except TypeError as e:
    raise ValueError(f"config.compress.prune.schedule: {e}") from None


def _prune(p: dict, shapes: dict, num_heads: int):
  _check_keys(p, PRUNE_KEYS, "config.compress.prune")
  method = p.get("method", "magnitude")
  paths = sorted(shapes)
  if method in ("heads", "mlp_units"):
    unit = "head" if method == "heads" else "mlp"
    pattern = p.get("pattern") or (structure.HEAD_PATTERN if unit == "head"
                                   else structure.MLP_PATTERN)
    match_paths(pattern, paths, "config.compress.prune.pattern")
    layout = structure.head_layout(num_heads) if unit == "head" else structure.mlp_layout()
    sparsity = pruning.check_sparsity(p.get("sparsity", 0.5), "config.compress.prune.sparsity")
    return rules([(pattern, structured.units(sparsity, layout, what=unit,
                                             schedule=_schedule(p)))], paths)
  if method == "n_m":
    n, m = int(p.get("n", 2)), int(p.get("m", 4))
    pattern = p.get("pattern", PRUNE_PATTERN)
    match_paths(pattern, paths, "config.compress.prune.pattern")
    try:
      t = pruning.n_of_m(n, m, begin=int(_as_dict(p.get("schedule")).get("begin", 0)))
    except ValueError as e:
      raise ValueError(f"config.compress.prune (n={n}, m={m}): {e}") from None
    return rules([(pattern, t)], paths)
  if method not in ("magnitude", "random"):
    raise ValueError(f"config.compress.prune.method={method!r} is unknown; valid: "
                     "magnitude, random, n_m, heads, mlp_units.")
  schedule = _schedule(p)
  scope = p.get("scope", "layer")
  pairs = [tuple(r) for r in (p.get("rules") or [])]
  where = [f"config.compress.prune.rules[{i}] ({r[0]!r}) sparsity" for i, r in enumerate(pairs)]
  if not pairs:
    pairs = [(p.get("pattern", PRUNE_PATTERN), p.get("sparsity", 0.5))]
    where = ["config.compress.prune.sparsity"]
  built = []
  for i, ((pattern, s), w) in enumerate(zip(pairs, where)):
    s = pruning.check_sparsity(s, w)
    t = pruning.unstructured(s, score=method, scope=scope, schedule=schedule)
    built.append((pattern, t.renamed(f"{t.name}_rule{i}") if len(pairs) > 1 else t))
  return rules(built, paths)


def _quant(q: dict, shapes: dict):
  _check_keys(q, QUANT_KEYS, "config.compress.quant")
  bits = quant.check_bits(q.get("bits", 8), "config.compress.quant.bits")
  t = quant.weights(bits, q.get("granularity", "channel"), float(q.get("clip_ratio", 1.0)))
  return rules([(q.get("pattern", QUANT_PATTERN), t)], list(shapes))


@dataclasses.dataclass(frozen=True)
class Frozen:
  """A frozen input of the step, restored from a checkpoint (a teacher's weights)."""
  name: str  # the method it is for
  label: str  # what to call it in the log
  checkpoint_dir: str
  abstract: Any  # its parameter tree as ShapeDtypeStructs


@dataclasses.dataclass(frozen=True)
class Compression:
  plan: Plan
  frozen: tuple = ()
  calibration: tuple = ()  # (examples, seed) when the plan calibrates
  export: bool = True
  settings: dict = dataclasses.field(default_factory=dict)  # recorded in the report


def _activations(a: dict, shapes: dict):
  _check_keys(a, ACTIVATION_KEYS, "config.compress.activations")
  bits = quant.check_bits(a.get("bits", 8), "config.compress.activations.bits")
  mode = a.get("mode", "fake")
  if mode not in activations.MODES:
    raise ValueError(f"config.compress.activations.mode={mode!r} is unknown; valid: "
                     "fake (fake-quant inputs), int8 (real int8 x int8 -> int32 matmuls).")
  if mode == "int8" and bits != 8:
    raise ValueError("config.compress.activations.mode='int8' needs bits=8.")
  p = a.get("percentile")
  if p is not None and not 50.0 <= float(p) <= 100.0:
    raise ValueError(f"config.compress.activations.percentile={p} must be in [50, 100].")
  try:
    m = activations.inputs(bits, mode, int8_grads=bool(a.get("int8_grads", True)),
                           percentile=None if p is None else float(p),
                           fmt=a.get("format", "int"))
  except ValueError as e:
    raise ValueError(f"config.compress.activations: {e}") from None
  settings = dict(bits=bits, mode=mode, percentile=p, format=a.get("format", "int"),
                  int8_grads=bool(a.get("int8_grads", True)))
  return rules([(a.get("pattern") or ACT_PATTERN, m)], list(shapes)), settings


GRID_KEYS = ("format", "bits", "symmetric", "granularity", "group_size", "ragged_groups")


def _grid(s: dict):
  return formats.grid(s.get("format", "int"), int(s.get("bits", 4)),
                      symmetric=bool(s.get("symmetric", True)),
                      granularity=s.get("granularity", "group"),
                      group_size=int(s.get("group_size", 128)),
                      ragged=bool(s.get("ragged_groups", False)))


def post_training_method(s: dict, where: str = "config.compress.post_training", grids=None):
  """One post-training method from its settings (see the module docstring); `grids`
  ({regex: Grid}) replaces the one grid the settings give: per-layer widths."""
  method = s.get("method", "gptq")
  if method not in PT_METHODS:
    raise ValueError(f"{where}.method={method!r} is unknown; valid: {', '.join(PT_METHODS)}.")
  n_m = (int(s.get("n", 0)), int(s["m"])) if int(s.get("m", 0) or 0) else None
  mode, damp, block = s.get("mode", "sequential"), float(s.get("damp", 0.01)), int(
      s.get("block", 128))
  try:
    def grid():
      return grids if grids is not None else _grid(s)
    if method == "rtn":
      return rtn.method(grid())
    if method == "gptq":
      return gptq.method(grid(), damp=damp, block=block, act_order=bool(s.get("act_order")),
                         mode=mode)
    if method == "awq":
      return awq.method(grid(), n_grid=int(s.get("n_grid", 20)), mode=mode)
    if method == "sparsegpt":
      return sparsegpt.method(float(s.get("sparsity", 0.5)), n_m=n_m, damp=damp, block=block,
                              grid=grid() if s.get("joint_quant") else None, mode=mode)
    if method == "wanda":
      return wanda.method(float(s.get("sparsity", 0.5)), n_m=n_m, mode=mode)
    return smoothquant.method(float(s.get("alpha", 0.5)), mode=s.get("act_mode", "fake"))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _post_training(p: dict, shapes: dict):
  _check_keys(p, PT_KEYS, "config.compress.post_training")
  paths = sorted(shapes)
  pairs = [tuple(r) for r in (p.get("rules") or [])]
  if not pairs:
    return rules([(p.get("pattern", PRUNE_PATTERN), post_training_method(p))], paths)
  overs = []
  for i, (pattern, over) in enumerate(pairs):
    over = _as_dict(over)
    where = f"config.compress.post_training.rules[{i}] ({pattern!r})"
    _check_keys(over, PT_KEYS - {"rules", "pattern"}, where)
    overs.append((pattern, over, where))
  if all(set(o) <= set(GRID_KEYS) for _, o, _ in overs):
    # one method, a grid per rule: kernels are calibrated in the forward's order, block
    # by block, whatever width each gets (an allocator's mixed precision)
    grids = {}
    for pattern, over, where in overs:
      try:
        grids[pattern] = _grid({**p, **over})
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    for pattern, _, where in overs:
      match_paths(pattern, paths, where)
    union = "|".join(f"(?:{pattern})" for pattern in grids)
    covered = set(match_paths(union, paths, "config.compress.post_training.rules"))
    base = p.get("pattern", PRUNE_PATTERN)  # the short name, when the rules cover it all
    base_hits = set(match_paths(base, paths, "config.compress.post_training.pattern"))
    return rules([(base if base_hits == covered else union,
                   post_training_method(p, grids=grids))], paths)
  built = []
  for i, (pattern, over, where) in enumerate(overs):
    m = post_training_method({**p, **over}, where)
    built.append((pattern, m.renamed(f"{m.name}_rule{i}")))
  return rules(built, paths)


def calibration_of(config):
  c = _as_dict(config.get("calibration"))
  _check_keys(c, CALIBRATION_KEYS, "config.calibration")
  examples = c.get("examples", 128)
  if not isinstance(examples, int) or examples < 1:
    raise ValueError(f"config.calibration.examples={examples!r} must be a positive integer "
                     "(training examples the calibrating methods see; 128 is the default).")
  batch = int(config.data.batch_size)
  if examples % batch:
    raise ValueError(f"config.calibration.examples={examples} is not a multiple of "
                     f"config.data.batch_size={batch}; use {max(batch, examples // batch * batch)}"
                     " or change the batch size.")
  return examples, int(c.get("seed", 0))


def _teacher_run_dir(config, teacher):
  if teacher == "init":  # self-distillation: the checkpoint the student starts from
    teacher = config.get("init") or ""
  if not teacher:
    raise ValueError("config.compress.distill.teacher is not set: give a trained run's "
                     "workdir, or 'init' to distil from config.init (self-distillation).")
  run_dir = os.path.normpath(teacher)
  if os.path.basename(run_dir) == "checkpoints":  # a run's checkpoints dir: its workdir is up
    run_dir = os.path.dirname(run_dir)
  return teacher, run_dir


def _distill(config, d: dict, read_checkpoints: bool = True):
  """-> (method, Frozen): every check done here: the teacher checkpoint exists and fits the
  teacher's model config (unless `read_checkpoints` is False: shapes only, for lowering)."""
  _check_keys(d, DISTILL_KEYS, "config.compress.distill")
  teacher, run_dir = _teacher_run_dir(config, d.get("teacher") or "")
  if d.get("teacher_model"):
    model_dict = d["teacher_model"]
  elif not read_checkpoints and not os.path.exists(os.path.join(run_dir, "config.json")):
    model_dict = config.model  # shapes only, no run on disk: the student's model
  else:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
      raise ValueError(f"config.compress.distill.teacher={teacher}: no config.json there to "
                       "read the teacher's model from; point at a run's workdir or set "
                       "config.compress.distill.teacher_model.")
    with open(path) as f:
      model_dict = json.load(f)["model"]
  teacher_cfg = ModelConfig.from_dict(_as_dict(model_dict))
  method = distill.method(
      lambda tp, batch: MultimodalModel(teacher_cfg).apply({"params": tp}, batch),
      temperature=float(d.get("temperature", 2.0)), alpha=float(d.get("alpha", 0.5)),
      features=tuple(d.get("features") or ()), feature_weight=float(d.get("feature_weight", 0.0)),
      where="config.compress.distill")
  ckpt_dir = checkpointing.checkpoint_dir(teacher)
  abstract = abstract_params(teacher_cfg)
  if not read_checkpoints:
    return method, Frozen(method.name, "teacher", ckpt_dir, abstract)
  reader = checkpointing.Checkpointer(ckpt_dir, read_only=True)
  step = reader.latest_step()
  if step is None:
    reader.close()
    raise ValueError(f"config.compress.distill.teacher={teacher} holds no checkpoint; point "
                     "it at a trained run's workdir.")
  try:
    reader.check_params_fit(step, abstract,
                            what="the teacher (config.compress.distill.teacher): params in")
  finally:
    reader.close()
  return method, Frozen(method.name, "teacher", ckpt_dir, abstract)


def build(config, model_cfg: ModelConfig, shapes: dict | None = None,
          read_checkpoints: bool = True) -> Compression:
  """config.compress -> Compression (an empty plan when nothing is set); `shapes`: the
  model's `param_shapes`, when the caller has them."""
  c = _as_dict(config.get("compress"))
  _check_keys(c, COMPRESS_KEYS, "config.compress")
  shapes = shapes or param_shapes(model_cfg)
  parts, frozen, settings = [], [], {}
  if c.get("prune"):
    parts.append(_prune(_as_dict(c["prune"]), shapes, model_cfg.num_heads))
  if c.get("quant"):
    parts.append(_quant(_as_dict(c["quant"]), shapes))
  if c.get("post_training"):
    parts.append(_post_training(_as_dict(c["post_training"]), shapes))
    settings["post_training"] = _as_dict(c["post_training"])
  if c.get("activations"):
    part, settings["activations"] = _activations(_as_dict(c["activations"]), shapes)
    parts.append(part)
  if c.get("distill"):
    method, teacher = _distill(config, _as_dict(c["distill"]), read_checkpoints)
    parts.append(method)
    frozen.append(teacher)
  plan = Plan(*parts).check(shapes)
  calibration = ()
  if plan.needs_calibration(list(shapes)):
    calibration = calibration_of(config)
    settings["calibration"] = dict(examples=calibration[0], seed=calibration[1])
  return Compression(plan, tuple(frozen), calibration, bool(c.get("export", True)), settings)


def abstract_params(model_cfg: ModelConfig):
  """The model's parameter tree as ShapeDtypeStructs (traced, nothing allocated)."""
  model = MultimodalModel(model_cfg)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           random_inputs(model_cfg, 1))["params"])


def param_shapes(model_cfg: ModelConfig) -> dict:
  """{path: shape} of the model's parameters, traced (nothing allocated)."""
  return {p: tuple(a.shape) for p, a in flatten(abstract_params(model_cfg)).items()}
