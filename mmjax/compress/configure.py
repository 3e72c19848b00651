"""`config.compress` -> a `Plan`, with every error raised at config time.

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

from mmjax.compress import pruning, quant, structured
from mmjax.compress.core import IDENTITY, Plan, chain, rules

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
    from mmjax.compress.core import match_paths
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
    from mmjax.compress.core import match_paths
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


def build_plan(compress_cfg, param_shapes: dict, num_heads: int = 1) -> Plan:
  """`param_shapes`: {path: shape} of the model's parameters (from jax.eval_shape);
  `num_heads`: the model's, for head pruning."""
  c = _as_dict(compress_cfg)
  # distill and activations are read by the trainer (a teacher checkpoint, calibration
  # batches): they act on the forward pass, not on the parameter tree
  _check_keys(c, {"prune", "quant", "export", "distill", "activations"}, "config.compress")
  parts = []
  if c.get("prune"):
    parts.append(_prune_transform(_as_dict(c["prune"]), param_shapes, num_heads))
  if c.get("quant"):
    parts.append(_quant_transform(_as_dict(c["quant"]), param_shapes))
  if not parts:
    return Plan(IDENTITY)
  return Plan(parts[0] if len(parts) == 1 else chain(*parts))
