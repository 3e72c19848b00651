"""The compression protocol: every method is one `Method`, a name and optional pure stages.

A method sees parameters as a flat dict `{path: array}` of the leaves its rule gave it
(paths like `image/block_00/mlp/fc1/kernel`, from any pytree: nested dicts, NNX state,
dataclasses) and keeps its state as a pytree. Each stage is a place in a training step:

  init(leaves, rng) -> state                 once, before training (or before PTQ)
  view(leaves, state) -> leaves              the weights the forward computes with; runs
                                             inside the gradient (fake-quant with a
                                             straight-through estimator)
  wrap(apply_fn, state, paths) -> apply_fn   what the forward does to activations (the
                                             inputs of the layers that consume `paths`)
  loss(fwd: Forward, state) -> (scalar, metrics)
                                             an extra loss term (distillation); its learned
                                             parts come from `init_params(fwd, rng)` and are
                                             ordinary trainable parameters, in `fwd.params`
  update(leaves, state, step) -> (leaves, state)
                                             after each optimizer step (`step` = steps
                                             taken) and once at step 0: schedules advance,
                                             masks are recomputed and applied
  calibrate(leaves, state, calib: Calibration) -> (leaves, state)
                                             from batches handed in: statistics (activation
                                             ranges) and, for post-training methods (GPTQ,
                                             SparseGPT, AWQ, ...), new weights
  describe(leaves, state) -> {path: info}    what each leaf became, for the report and the
                                             export: `mask`, `n_m`, `codes` (+ `bits`,
                                             `scale_axes`, `clip_ratio`), `act_scale`,
                                             `act_bits`, or `bytes` that a method states for
                                             a storage format mmjax does not know
  check(shapes) -> None                      {path: shape} -> ValueError, before anything runs
  accepts(path, leaf) -> None | reason       which matched leaves the method can compress
                                             (`leaf`: a jax.ShapeDtypeStruct); the others
                                             are left as they are, said once in a warning
                                             and in `describe` ("skipped": reason)

Constraints on the master weights (pruning masks) live in `update` alone: the weights are
masked at step 0 and after every optimizer step, so the mask costs one elementwise pass
fused into the optimizer's update, and `view` is for weights that differ from the master
copy (fake-quant).

`rules([(regex, method), ...])` hands each method the paths its regex fully matches (first
match wins; a rule matching nothing is an error listing the paths) that its `accepts`
takes (a rule whose method takes none of its matches is an error); `Plan(part, ...)`
composes parts in order (prune, then quantize what remains), and a path may have only one
method per stage. The compression state is `{method name: state}`: a checkpoint stays
readable when rules are reordered. Every stage is jit-compatible and runs inside the one
jitted train step (`mmjax.compress.step`), or in a user's own loop.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
import zlib
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Flat = dict  # {path: array}
STAGES = ("init", "view", "wrap", "loss", "update", "calibrate", "describe")
EXCLUSIVE = ("view", "wrap", "update")  # one method per path for each of these


class Forward(NamedTuple):
  """What a `loss` stage sees: the model's outputs and intermediates on `batch`, this
  method's trainable parameters and its frozen inputs (a teacher's weights, say)."""
  outputs: Any
  intermediates: Any
  batch: Any
  params: Any = None
  frozen: Any = None


class Calibration(NamedTuple):
  """What a `calibrate` stage sees: the forward (`apply_fn(params, batch)`, wrapped by the
  methods before this one), the weights it computes with, the batches, this method's paths."""
  apply_fn: Callable
  params: Any
  batches: Sequence
  paths: tuple


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  init: Optional[Callable] = None
  view: Optional[Callable] = None
  wrap: Optional[Callable] = None
  loss: Optional[Callable] = None
  update: Optional[Callable] = None
  calibrate: Optional[Callable] = None
  describe: Optional[Callable] = None
  init_params: Optional[Callable] = None
  check: Optional[Callable] = None
  accepts: Optional[Callable] = None  # (path, ShapeDtypeStruct) -> None | why not
  task_weight: float = 1.0  # the task loss is scaled by the product over methods

  def __post_init__(self):
    if not any(getattr(self, s) is not None for s in STAGES if s != "init"):
      raise ValueError(f"compression method {self.name!r} defines none of the stages "
                       f"{', '.join(s for s in STAGES if s != 'init')}; give it at least one.")

  def renamed(self, name: str) -> "Method":
    return dataclasses.replace(self, name=name)


# ------------------------------------------------------------------------- paths

def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree) -> Flat:
  """{"a/b/kernel": leaf} for any pytree (dict keys, attributes and indices joined by /)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_str(k) for k in path): leaf for path, leaf in leaves}


def unflatten(flat: Flat, like=None):
  """The tree `like` (its structure) with leaves from `flat`; without `like`, nested dicts."""
  if like is not None:
    paths = list(flatten(like))
    return jax.tree_util.tree_structure(like).unflatten([flat[p] for p in paths])
  out = {}
  for path, leaf in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


def match_paths(pattern: str, paths: Sequence[str], what: str = "rule") -> list:
  """Paths that fully match `pattern`; none is an error that lists the paths."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}.") from None
  hits = [p for p in paths if rx.fullmatch(p)]
  if not hits:
    listing = "\n  ".join(paths)
    raise ValueError(f"{what} {pattern!r} matches no parameter (patterns must match a whole "
                     f"path). The parameter paths are:\n  {listing}")
  return hits


def leaf_specs(leaves) -> dict:
  """{path: jax.ShapeDtypeStruct} of a flat dict of arrays (or tracers, or structs), or of
  `{path: shape}` (a shape alone is taken as float32: what a model's config gives)."""
  out = {}
  for p, x in leaves.items():
    if isinstance(x, (tuple, list)):
      out[p] = jax.ShapeDtypeStruct(tuple(int(d) for d in x), jnp.float32)
    else:
      dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
      out[p] = jax.ShapeDtypeStruct(tuple(np.shape(x)), dtype)
  return out


# ------------------------------------------------------------------- composition

class Entry(NamedTuple):
  method: Method
  paths: tuple  # the leaves the method owns (empty for a loss-only method)
  skipped: tuple = ()  # ((path, why), ...): matched by its rule, refused by its `accepts`


def _take(method: Method, rule: str, hits: Sequence[str], specs: dict | None) -> Entry:
  """The leaves of `hits` the method accepts (all of them without `accepts` or `specs`);
  the others are skipped, said once in a warning; none taken is an error."""
  if method.accepts is None or specs is None or not hits:
    return Entry(method, tuple(hits))
  taken, skipped = [], []
  for p in hits:
    why = method.accepts(p, specs[p])
    if why is None:
      taken.append(p)
    else:
      skipped.append((p, str(why)))
  if skipped:
    some = "; ".join(f"{p}: {why}" for p, why in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    if not taken:
      raise ValueError(f"{rule}: compression method {method.name!r} can compress none of the "
                       f"{len(hits)} leaves it matches ({some}{more}); narrow the rule to "
                       "leaves it compresses (e.g. '.*/kernel') or give them another method.")
    warnings.warn(f"{rule}: compression method {method.name!r} leaves {len(skipped)} of the "
                  f"{len(hits)} leaves it matches as they are ({some}{more}); they are "
                  "described as skipped (narrow the rule to silence this).")
  return Entry(method, tuple(taken), tuple(skipped))


@dataclasses.dataclass(frozen=True)
class Rules:
  """[(regex, method), ...]: each path to the first rule whose regex matches it in full;
  of those, the method takes the leaves its `accepts` takes (given their `specs`)."""
  pairs: tuple

  def bind(self, paths: Sequence[str], specs: dict | None = None) -> list:
    paths = sorted(paths)
    owned, claimed = [], set()
    for pattern, method in self.pairs:
      if not isinstance(method, Method):
        raise TypeError(f"rule {pattern!r}: {method!r} is not a compression Method.")
      hits = [p for p in match_paths(pattern, paths) if p not in claimed]
      if not hits:
        raise ValueError(f"rule {pattern!r} matches only paths an earlier rule already took "
                         f"({match_paths(pattern, paths)[:4]}...); reorder or narrow the "
                         "rules.")
      claimed.update(hits)  # a leaf the method skips stays with its rule (first match wins)
      owned.append(_take(method, f"rule {pattern!r}", hits, specs))
    return owned


def rules(pairs: Sequence[tuple], paths=None) -> Rules:
  """Path rules; with `paths` (the model's, known from its config before any parameter
  exists; `{path: shape}` also runs the methods' `accepts`) they are checked at once, so a
  bad regex fails at config time."""
  r = Rules(tuple((p, m) for p, m in pairs))
  if paths is not None:
    r.bind(list(paths), leaf_specs(paths) if isinstance(paths, dict) else None)
  return r


def chain(*parts) -> tuple:
  """Parts applied in order (a `Plan` of them is the same)."""
  return tuple(parts)


def _parts(parts) -> list:
  out = []
  for p in parts:
    if isinstance(p, (tuple, list)):
      out.extend(_parts(p))
    elif isinstance(p, Plan):
      out.extend(p.parts)
    elif isinstance(p, (Method, Rules)):
      out.append(p)
    else:
      raise TypeError(f"a compression plan is made of Methods and rules(...), got {p!r}.")
  return out


def _seed(rng, name):
  return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _sub(flat, paths):
  return {p: flat[p] for p in paths}


class Plan:
  """Methods bound to a model's parameter paths: what a train step calls, stage by stage.

  Built from parts (`Method`s, `rules(...)`); bound to the leaves lazily (the first call
  that sees parameters) or explicitly with `entries`/`check`, which raise every conflict.
  A binding is kept per set of leaves (paths, shapes, dtypes): a plan warns once about the
  leaves its methods skip."""

  def __init__(self, *parts):
    self.parts = _parts(parts)
    self._bound = {}

  # ---- binding
  def entries(self, leaves) -> list:
    """The methods and the leaves each owns. `leaves`: `{path: array, ShapeDtypeStruct or
    shape}` (each method's `accepts` then decides which of its matches it takes), or the
    paths alone (the rules' regexes only: which methods the plan binds, not what they
    skip)."""
    specs = leaf_specs(leaves) if isinstance(leaves, dict) else None
    paths = tuple(sorted(leaves))
    key = paths if specs is None else tuple(
        (p, specs[p].shape, str(specs[p].dtype)) for p in paths)
    if key not in self._bound:
      out = []
      for part in self.parts:
        if isinstance(part, Rules):
          out.extend(part.bind(paths, specs))
        elif any(getattr(part, s) is not None for s in ("view", "update", "describe")) or (
            part.wrap is not None):  # a bare path method owns every leaf it accepts
          out.append(_take(part, "a method given every leaf (no rule)", paths, specs))
        else:
          out.append(Entry(part, ()))
      names = [e.method.name for e in out]
      dup = sorted({n for n in names if names.count(n) > 1})
      if dup:
        raise ValueError(f"two compression methods are named {dup[0]!r}; the state is keyed "
                         "by name, so give one another with method.renamed('...').")
      for stage in EXCLUSIVE:
        owner = {}
        for e in out:
          if getattr(e.method, stage) is None:
            continue
          for p in e.paths:
            if p in owner:
              raise ValueError(f"methods {owner[p]!r} and {e.method.name!r} both claim {p} "
                               f"for the {stage} stage; a path takes one method per stage "
                               "(narrow one rule, or put both in one rules([...]) where the "
                               "first match wins).")
            owner[p] = e.method.name
      self._bound[key] = out
    return self._bound[key]

  def check(self, shapes: dict) -> "Plan":
    """Bind to `{path: shape}` (or arrays, ShapeDtypeStructs) and run every method's shape
    checks on the leaves it takes (config time)."""
    specs = leaf_specs(dict(shapes))
    for e in self.entries(specs):
      if e.method.check is not None:
        try:
          e.method.check({p: specs[p].shape for p in e.paths})
        except ValueError as err:
          raise ValueError(f"compression method {e.method.name!r}: {err}") from None
    return self

  @property
  def is_identity(self) -> bool:
    return not self.parts

  @property
  def name(self) -> str:
    names = []
    for part in self.parts:
      if isinstance(part, Rules):
        names.append(",".join(f"{p}:{m.name}" for p, m in part.pairs))
      else:
        names.append(part.name)
    return "+".join(names) or "identity"

  @property
  def task_weight(self) -> float:
    w = 1.0
    for m in self.methods():
      w *= m.task_weight
    return w

  def methods(self) -> list:
    """Every method of the plan, in order (bound or not)."""
    return [m for part in self.parts
            for m in ([m for _, m in part.pairs] if isinstance(part, Rules) else [part])]

  def _with(self, params, stage):
    flat = flatten(params)
    return flat, [e for e in self.entries(flat) if getattr(e.method, stage) is not None]

  # ---- stages on nested trees
  def init(self, params, rng) -> dict:
    flat = flatten(params)
    state = {}
    for e in self.entries(flat):
      init = e.method.init
      state[e.method.name] = init(_sub(flat, e.paths), _seed(rng, e.method.name)) if init else {}
    return state

  def view(self, params, state):
    flat, entries = self._with(params, "view")
    if not entries:
      return params
    out = dict(flat)
    for e in entries:
      out.update(e.method.view(_sub(out, e.paths), state[e.method.name]))
    return unflatten(out, params)

  def wrap(self, apply_fn, state, params_paths):
    """`apply_fn` with every method's activation stage, the first method innermost.
    `params_paths`: the parameters' `{path: array or shape}`, or their paths alone; with
    paths alone, a plan whose activation stages decide by shape (`accepts`) binds when the
    wrapped function is called, from the parameters it is given."""
    if not isinstance(params_paths, dict) and any(
        m.wrap is not None and m.accepts is not None for m in self.methods()):
      return lambda params, *a, **k: self.wrap(apply_fn, state, flatten(params))(
          params, *a, **k)
    for e in self.entries(params_paths):
      if e.method.wrap is not None:
        apply_fn = e.method.wrap(apply_fn, state[e.method.name], e.paths)
    return apply_fn

  def apply(self, apply_fn, params, state):
    """The compressed forward: `plan.apply(f, params, cstate)(*args)` = f(view, *args)
    with the activation stages around it."""
    wrapped = self.wrap(apply_fn, state, flatten(params))
    view = self.view(params, state)
    return lambda *args, **kwargs: wrapped(view, *args, **kwargs)

  def update(self, params, state, step):
    flat, entries = self._with(params, "update")
    if not entries:
      return params, state
    out, state = dict(flat), dict(state)
    for e in entries:
      new, state[e.method.name] = e.method.update(_sub(out, e.paths), state[e.method.name],
                                                  step)
      out.update(new)
    return unflatten(out, params), state

  def start(self, params, rng):
    """-> (params, state): `init`, then `update` at step 0 (masks applied to the weights).
    What a run does before its first step; use it, not `init`, to get the compressed view."""
    return self.update(params, self.init(params, rng), 0)

  def init_params(self, fwd: Forward, rng, frozen=None) -> dict:
    """Trainable parameters of the loss stages, {method name: tree} (sized from `fwd`, a
    forward on a sample batch)."""
    return {m.name: m.init_params(fwd._replace(frozen=(frozen or {}).get(m.name)),
                                  _seed(rng, m.name))
            for m in self.methods() if m.init_params is not None}

  def loss(self, fwd: Forward, state, aux=None, frozen=None):
    """-> (sum of the loss stages, their metrics)."""
    total, metrics = 0.0, {}
    for m in self.methods():
      if m.loss is not None:
        value, mets = m.loss(fwd._replace(params=(aux or {}).get(m.name),
                                          frozen=(frozen or {}).get(m.name)),
                             state.get(m.name, {}))
        total = total + value
        metrics.update(mets)
    return total, metrics

  @property
  def has_loss(self) -> bool:
    return any(m.loss is not None for m in self.methods())

  def needs_calibration(self, paths) -> bool:
    """Whether a method of the plan has a calibrate stage (`paths`: as `entries` takes)."""
    return any(e.method.calibrate is not None for e in self.entries(paths))

  def calibrate(self, apply_fn, params, state, batches):
    """-> (params, state): each calibrating method in order, seeing the weights' view and
    the activation stages of the methods before it, and the weights the methods before it
    produced (a post-training method after pruning calibrates on the pruned model)."""
    flat = flatten(params)
    state = dict(state)
    fn = apply_fn
    for e in self.entries(flat):
      if e.method.calibrate is not None:
        view = jax.jit(self.view)(unflatten(flat, params), state)
        new, state[e.method.name] = e.method.calibrate(
            _sub(flat, e.paths), state[e.method.name],
            Calibration(fn, view, tuple(batches), e.paths))
        flat = {**flat, **new}
      if e.method.wrap is not None:
        fn = e.method.wrap(fn, state[e.method.name], e.paths)
    return unflatten(flat, params), state

  def describe(self, params, state) -> dict:
    """{path: info} merged over methods (views composed in order, as the forward sees);
    a leaf a method's rule matched but the method skipped has `"skipped"`: the reason."""
    flat = flatten(params)
    merged = {}
    entries = self.entries(flat)
    for e in entries:
      for path, why in e.skipped:
        merged.setdefault(path, {}).setdefault("skipped", f"{e.method.name}: {why}")
    last = max((i for i, e in enumerate(entries) if e.method.describe is not None), default=-1)
    for e in entries[:last + 1]:
      if e.method.describe is not None:
        for path, info in e.method.describe(_sub(flat, e.paths), state[e.method.name]).items():
          merged.setdefault(path, {}).update(info)
      if e.method.view is not None:  # jitted: one program, not an op-by-op pass per leaf
        flat = {**flat, **jax.jit(e.method.view)(_sub(flat, e.paths), state[e.method.name])}
    return merged
