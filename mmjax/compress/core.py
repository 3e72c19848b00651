"""The compression protocol: a transform is three pure functions over the parameter tree.

A `Transform` sees parameters as a *flat dict* `{path: array}` (paths like
`image/block_00/attn/query/kernel`) and keeps whatever state it needs as a pytree:

  init(flat, rng) -> state                  once, before training (or before PTQ)
  forward(flat, state) -> flat              the view the forward pass computes with; runs
                                            inside the gradient, so it may use a
                                            straight-through estimator (fake-quant)
  update(flat, state, step) -> (flat, state)
                                            after each optimizer step; `step` is the number
                                            of steps taken. Schedules advance here, masks
                                            are recomputed and re-applied. It also runs
                                            once at step 0, right after init (`Plan.start`)
  describe(flat, state) -> {path: {...}}    optional: what the transform did to each leaf
                                            (`bits`, `mask`, `n_m`) for reports and export

Constraints on the master weights (pruning masks) live in `update` alone: the weights are
masked at step 0 and after every optimizer step, so they are already exact zeros wherever
the mask says so, and `forward` need not mask them again. That puts the whole cost of a
mask into the optimizer's elementwise update (where XLA fuses it), once per step, instead
of a masking pass in the forward, another over the gradient and a third after the update.
`forward` is for views that differ from the master weights (fake-quant).

Transforms only ever see the leaves they were given, so `rules([(regex, t), ...])` can
hand each one its own part of the tree, and `chain(t1, t2)` composes views left to right
(prune, then quantize what remains). Everything is jit-compatible; the harness calls
`forward` and `update` inside its one jitted train step and checkpoints the state with the
parameters. A new transform is a `Transform(...)` of a few functions; nothing in mmjax
needs to know about it (see notebooks/new_transform.ipynb).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

import jax
from flax import traverse_util

Flat = dict  # {path: array}


def _same(flat, state):
  return flat


def _no_update(flat, state, step):
  return flat, state


@dataclasses.dataclass(frozen=True)
class Transform:
  init: Callable[[Flat, jax.Array], Any]
  forward: Callable[[Flat, Any], Flat] = _same
  update: Callable[[Flat, Any, jax.Array], tuple] = _no_update
  describe: Optional[Callable[[Flat, Any], dict]] = None
  name: str = "transform"


IDENTITY = Transform(init=lambda flat, rng: {}, name="identity")


def flatten(params) -> Flat:
  return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Flat):
  return traverse_util.unflatten_dict(flat, sep="/")


def chain(*transforms: Transform) -> Transform:
  """Apply transforms in order: views compose left to right, updates run left to right,
  states are a tuple (one per transform)."""
  ts = tuple(transforms)

  def init(flat, rng):
    return tuple(t.init(flat, jax.random.fold_in(rng, i)) for i, t in enumerate(ts))

  def forward(flat, states):
    for t, s in zip(ts, states):
      flat = t.forward(flat, s)
    return flat

  def update(flat, states, step):
    out = []
    for t, s in zip(ts, states):
      flat, s = t.update(flat, s, step)
      out.append(s)
    return flat, tuple(out)

  def describe(flat, states):
    merged = {}
    for t, s in zip(ts, states):
      if t.describe is not None:
        for path, info in t.describe(flat, s).items():
          merged.setdefault(path, {}).update(info)
      flat = t.forward(flat, s)
    return merged

  return Transform(init, forward, update, describe, name="+".join(t.name for t in ts))


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


def rules(pairs: Sequence[tuple], paths: Sequence[str]) -> Transform:
  """Per-path transforms: `pairs` is [(regex, transform), ...]; each path goes to the
  first rule whose regex matches it in full, paths matching no rule are left alone, and a
  rule that matches nothing is an error. `paths` are the model's parameter paths (known
  from the config, before any parameter exists), so the error comes at config time."""
  paths = sorted(paths)
  owned, claimed = [], set()
  for pattern, t in pairs:
    hits = [p for p in match_paths(pattern, paths) if p not in claimed]
    if not hits:
      raise ValueError(f"rule {pattern!r} matches only paths an earlier rule already took "
                       f"({match_paths(pattern, paths)[:4]}...); reorder or narrow the rules.")
    claimed.update(hits)
    owned.append((tuple(hits), t))

  def sub(flat, keys):
    return {k: flat[k] for k in keys}

  def init(flat, rng):
    return tuple(t.init(sub(flat, keys), jax.random.fold_in(rng, i))
                 for i, (keys, t) in enumerate(owned))

  def forward(flat, states):
    flat = dict(flat)
    for (keys, t), s in zip(owned, states):
      flat.update(t.forward(sub(flat, keys), s))
    return flat

  def update(flat, states, step):
    flat, out = dict(flat), []
    for (keys, t), s in zip(owned, states):
      new, s = t.update(sub(flat, keys), s, step)
      flat.update(new)
      out.append(s)
    return flat, tuple(out)

  def describe(flat, states):
    merged = {}
    for (keys, t), s in zip(owned, states):
      if t.describe is not None:
        merged.update(t.describe(sub(flat, keys), s))
    return merged

  name = ",".join(f"{p}:{t.name}" for p, t in pairs)
  return Transform(init, forward, update, describe, name=f"rules[{name}]")


@dataclasses.dataclass(frozen=True)
class Plan:
  """A transform bound to nested parameter trees: what the train step calls."""
  transform: Transform = IDENTITY

  def init(self, params, rng):
    return self.transform.init(flatten(params), rng)

  def start(self, params, rng):
    """-> (params, state): `init`, then `update` at step 0 (masks applied to the weights).
    What a run does before its first step; use it, not `init`, to get the compressed view."""
    state = self.transform.init(flatten(params), rng)
    flat, state = self.transform.update(flatten(params), state, 0)
    return unflatten(flat), state

  def forward(self, params, state):
    return unflatten(self.transform.forward(flatten(params), state))

  def update(self, params, state, step):
    flat, state = self.transform.update(flatten(params), state, step)
    return unflatten(flat), state

  def describe(self, params, state) -> dict:
    if self.transform.describe is None:
      return {}
    return self.transform.describe(flatten(params), state)

  @property
  def is_identity(self) -> bool:
    return self.transform is IDENTITY
