"""A compression plan: methods (`protocol.Method`) bound to a model's parameter paths by
rules (`binding`), composed in order, stage by stage.

`rules([(regex, method), ...])` hands each method the paths its regex fully matches (first
match wins; a rule matching nothing is an error listing the paths) that its `accepts`
takes (a rule whose method takes none of its matches is an error); `Plan(part, ...)`
composes parts in order (prune, then quantize what remains), and a path may have only one
method per stage. The compression state is `{method name: state}`: a checkpoint stays
readable when rules are reordered. Every stage is jit-compatible and runs inside the one
jitted train step (`mmjax.compress.step`), or in a user's own loop.
"""
from __future__ import annotations

import zlib

import jax

from mmjax.compress import hooks as hooks_lib
from mmjax.compress import storage
from mmjax.compress.binding import Entry, Rules, _take, rules  # noqa: F401  (re-exported)
from mmjax.compress.paths import (Flat, flatten, leaf_specs, match_paths,  # noqa: F401
                                  unflatten)
from mmjax.compress.protocol import (EXCLUSIVE, STAGES, TRAINABLE, Calibration,  # noqa: F401
                                     Forward, Method)


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
          if getattr(e.method, stage) is None or (stage == "view" and e.method.adds):
            continue
          for p in e.paths:
            if p in owner:
              raise ValueError(f"methods {owner[p]!r} and {e.method.name!r} both claim {p} "
                               f"for the {stage} stage; a path takes one method per stage "
                               "(narrow one rule, or put both in one rules([...]) where the "
                               "first match wins).")
            owner[p] = e.method.name
      for i, e in enumerate(out):  # an adding view composes on top of earlier views only
        if e.method.adds:
          later = [(f.method.name, p) for f in out[i + 1:] if f.method.view is not None
                   and not f.method.adds for p in set(e.paths) & set(f.paths)]
          if later:
            raise ValueError(f"method {e.method.name!r} adds to the view of {later[0][1]}, "
                             f"but {later[0][0]!r} views it later; put the adding method "
                             "after the one whose view it adds to.")
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
    return self.hooked(apply_fn, state)

  def hooked(self, apply_fn, state):
    """`apply_fn` with every method's module hooks (bound to `state`) applied; itself if
    no method has hooks."""
    hooks = self.hooks(state)
    return hooks_lib.apply(apply_fn, [(p, f, n) for n, p, f in hooks]) if hooks else apply_fn

  def hooks(self, state) -> list:
    """[(method name, module regex, fn)] of every method's hooks, each bound to its
    method's state: fn(output) -> output, or `hooks.Around` of fn(ModuleCall) (its carry
    shared by the method's hooks within one forward)."""
    out = []
    for m in self.methods():
      st = state.get(m.name, {})
      for pattern, fn in m.hooks or ():
        if isinstance(fn, hooks_lib.Around):
          bound = hooks_lib.Around(lambda call, fn=fn.fn, st=st: fn(call, st))
        else:
          bound = lambda out, fn=fn, st=st: fn(out, st)
        out.append((m.name, pattern, bound))
    return out

  def check_hooks(self, apply_fn, params, state, *args) -> "Plan":
    """The hooks against the forward, traced for shapes (before anything runs): patterns
    that match no module, outputs the next module cannot take."""
    hooks = self.hooks(state)
    if hooks:
      hooks_lib.check(lambda p, *a: apply_fn(self.view(p, state), *a), hooks, params, *args)
    return self

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

  # ---- trainable factors: the state's "trainable" entries, optimized with the model
  @property
  def trains(self) -> bool:
    return any(m.trains for m in self.methods())

  def split(self, state) -> tuple:
    """-> ({method name: its trainable tree}, the state without them): what the train
    step optimizes, and the rest."""
    train, rest = {}, dict(state)
    for m in self.methods():
      if m.trains and m.name in state:
        s = state[m.name]
        if not isinstance(s, dict) or TRAINABLE not in s:
          raise ValueError(f"compression method {m.name!r} has trains=True, but its state "
                           f"has no {TRAINABLE!r} entry: its init must return a dict with one.")
        train[m.name] = s[TRAINABLE]
        rest[m.name] = {k: v for k, v in s.items() if k != TRAINABLE}
    return train, rest

  def merge(self, state, trainables) -> dict:
    """The state with the trainable trees (`split`'s first part, or the train state's
    `aux`: entries of methods that do not train are ignored) put back."""
    if not trainables:
      return state
    out = dict(state)
    for m in self.methods():
      if m.trains and m.name in trainables and m.name in out:
        out[m.name] = {**out[m.name], TRAINABLE: trainables[m.name]}
    return out

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

  def calibrate(self, apply_fn, params, state, batches, loss=None, row_groups=None):
    """-> (params, state): each calibrating method in order, seeing the weights' view and
    the activation stages of the methods before it, and the weights the methods before it
    produced (a post-training method after pruning calibrates on the pruned model). Every
    method's module hooks apply from the start: statistics come from the tokens the model
    will run on (merged, pruned). `loss(outputs, batch) -> scalar` (the task's) and
    `row_groups(apply_fn, params, batch) -> fn(path, row shape)` (the model's modality of
    each token, read off the calibration forward: hooks included) are for the methods that
    weigh tokens by sensitivity (`balance=`)."""
    flat = flatten(params)
    state = dict(state)
    fn = self.hooked(apply_fn, state)
    for e in self.entries(flat):
      if e.method.calibrate is not None:
        view = jax.jit(self.view)(unflatten(flat, params), state)
        new, state[e.method.name] = e.method.calibrate(
            _sub(flat, e.paths), state[e.method.name],
            Calibration(fn, view, tuple(batches), e.paths, loss, row_groups))
        flat = {**flat, **new}
      if e.method.wrap is not None:
        fn = e.method.wrap(fn, state[e.method.name], e.paths)
    return unflatten(flat, params), state

  def describe(self, params, state) -> dict:
    """{path: storage.Stored}: the records every method's describe gave each leaf, merged
    by role over methods (views composed in order, as the forward sees); a leaf a method's
    rule matched but the method skipped has `skipped`: the reason."""
    flat = flatten(params)
    merged = {}
    entries = self.entries(flat)
    for e in entries:
      for path, why in e.skipped:
        if path not in merged:
          merged[path] = storage.Stored(skipped=f"{e.method.name}: {why}")
    last = max((i for i, e in enumerate(entries) if e.method.describe is not None), default=-1)
    for e in entries[:last + 1]:
      if e.method.describe is not None:
        for path, records in e.method.describe(_sub(flat, e.paths), state[e.method.name]).items():
          merged[path] = storage.merge(merged.get(path), records,
                                       f"compression method {e.method.name!r}: describe of {path}")
      if e.method.view is not None:  # jitted: one program, not an op-by-op pass per leaf
        flat = {**flat, **jax.jit(e.method.view)(_sub(flat, e.paths), state[e.method.name])}
    return merged
