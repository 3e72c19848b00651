"""Pruning transforms: unstructured (magnitude or random; per layer or global) and N:M.

State: `{"masks": {path: bool array}, "key": rng}`. `update` applies the masks to the
master weights at step 0 and after every optimizer step, so pruned weights are exactly zero
whatever the optimizer's moments say, and the forward pass computes with the weights as
they are (no second masking pass; see `core`). Pruned weights do get a gradient, which the
next `update` discards. Masks are recomputed from the current weights at the ramp's
update steps only (`lax.cond`: other steps pay just the elementwise mask, fused into the
optimizer's update).

The sparsity ramp (Zhu & Gupta 2017): one-shot at `begin`, or polynomial from `initial`
to the target between `begin` and `end`, recomputed every `every` steps:
    s(t) = target + (initial - target) * (1 - (t - begin) / (end - begin)) ** power
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmjax.compress import layout, storage
from mmjax.compress.core import Method
from mmjax.compress.select import n_m_mask, top_k_masks


@dataclasses.dataclass(frozen=True)
class Ramp:
  kind: str = "one_shot"  # or "polynomial"
  begin: int = 0
  end: int = 0
  every: int = 100
  power: float = 3.0
  initial: float = 0.0

  def validate(self, where="ramp"):
    if self.kind not in ("one_shot", "polynomial"):
      raise ValueError(f"{where}.kind={self.kind!r} is unknown; valid: one_shot, polynomial.")
    if self.begin < 0:
      raise ValueError(f"{where}.begin={self.begin} must be >= 0.")
    if self.kind == "polynomial":
      if self.end <= self.begin:
        raise ValueError(f"{where}.end={self.end} must be > begin={self.begin}.")
      if self.every < 1:
        raise ValueError(f"{where}.every={self.every} must be >= 1.")
      if not 0.0 <= self.initial < 1.0:
        raise ValueError(f"{where}.initial={self.initial} must be in [0, 1).")
    return self

  def sparsity(self, step, target):
    step = jnp.asarray(step, jnp.float32)
    if self.kind == "one_shot":
      return jnp.where(step >= self.begin, target, 0.0)
    frac = jnp.clip((step - self.begin) / (self.end - self.begin), 0.0, 1.0)
    s = target + (self.initial - target) * (1.0 - frac) ** self.power
    return jnp.where(step >= self.begin, s, 0.0)

  def is_update_step(self, step):
    if self.kind == "one_shot":
      return step == self.begin
    on_grid = (step - self.begin) % self.every == 0
    return (step >= self.begin) & (step <= self.end) & (on_grid | (step == self.end))


def check_sparsity(sparsity, where="sparsity"):
  if not 0.0 <= float(sparsity) < 1.0:
    raise ValueError(f"{where}={sparsity} is outside [0, 1): it is the fraction of weights "
                     "removed (0.9 keeps 10%).")
  return float(sparsity)


def _keep(n, sparsity):
  return n - jnp.round(sparsity * n).astype(jnp.int32)


def apply_masks(flat, masks):
  """The one place masks meet weights: zero where the mask is False (structured pruning
  uses it too)."""
  return {p: jnp.where(masks[p], w, jnp.zeros((), w.dtype)) if p in masks else w
          for p, w in flat.items()}


def unstructured(sparsity: float, *, score: str = "magnitude", scope: str = "layer",
                 ramp: Ramp = Ramp(), name: str | None = None) -> Method:
  """Magnitude (|w|) or random pruning to `sparsity`, each layer to its own target
  (`scope="layer"`) or one threshold over all the leaves this transform owns ("global")."""
  target = check_sparsity(sparsity)
  if score not in ("magnitude", "random"):
    raise ValueError(f"pruning score={score!r} is unknown; valid: magnitude, random.")
  if scope not in ("layer", "global"):
    raise ValueError(f"pruning scope={scope!r} is unknown; valid: layer, global.")
  ramp.validate()

  def scores(flat, key):
    if score == "magnitude":
      return {p: jnp.abs(w) for p, w in flat.items()}
    # random scores drawn from a fixed key: masks stay nested as sparsity grows
    return {p: jax.random.uniform(jax.random.fold_in(key, i), w.shape)
            for i, (p, w) in enumerate(sorted(flat.items()))}

  def masks_at(flat, key, s):
    sc = scores(flat, key)
    paths = sorted(sc)
    if scope == "global":
      n = sum(sc[p].size for p in paths)
      return dict(zip(paths, top_k_masks([sc[p] for p in paths], _keep(n, s))))
    return {p: top_k_masks([sc[p]], _keep(sc[p].size, s))[0] for p in paths}

  def init(flat, rng):
    return {"masks": masks_at(flat, rng, ramp.sparsity(0, target)), "key": rng}

  def update(flat, state, step):
    masks = jax.lax.cond(ramp.is_update_step(step),
                         lambda: masks_at(flat, state["key"], ramp.sparsity(step, target)),
                         lambda: state["masks"])
    return apply_masks(flat, masks), {"masks": masks, "key": state["key"]}

  def describe(flat, state):
    return {p: storage.Mask(m) for p, m in state["masks"].items()}

  return Method(name or f"{score}_{scope}_{target:g}", init=init, update=update,
                describe=describe)


def n_of_m(n: int = 2, m: int = 4, *, begin: int = 0, every: int | None = None,
           contract=None, name: str | None = None) -> Method:
  """N:M semi-structured pruning along the contraction axes (`layout`: by default every
  axis but the last; conv kernels [h, w, in, out] group along h*w*in), from step `begin`.

  By default the mask is chosen once, at `begin`, and kept. `every=k` chooses it again
  from the current weights at `begin` and every k steps after (`every=1`: each step), so
  a pruned weight that the optimizer's steps carry past a kept one in its group takes
  its place (pruned weights get gradients; `update` zeroes them after each step)."""
  if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
    raise ValueError(f"N:M pruning needs integers 1 <= N < M, got N={n}, M={m}.")
  if every is not None and not (isinstance(every, int) and every >= 1):
    raise ValueError(f"N:M pruning every={every!r} must be a whole number of steps >= 1 "
                     "(1: a new mask each step), or None to choose the mask once, at begin.")

  def is_update_step(step):
    step = jnp.asarray(step)
    if every is None:
      return step == begin
    return (step >= begin) & ((step - begin) % every == 0)

  def check(shapes):
    layout.check(contract, shapes, f"{n}:{m} pruning")
    for path, shape in shapes.items():
      rows = 1
      for a in layout.contract_axes(contract, path, len(shape)):
        rows *= shape[a]
      if len(shape) < 2 or rows % m:
        raise ValueError(f"N:M pruning with M={m}: {path} has shape {tuple(shape)}, whose "
                         f"contraction size ({rows}) is not divisible by M (or it is not a "
                         "kernel); narrow the rule's regex or choose another M.")

  def masks_at(flat):
    return {p: n_m_mask(w, n, m, layout.contract_axes(contract, p, w.ndim))
            for p, w in flat.items()}

  def init(flat, rng):
    full = {p: jnp.ones(w.shape, bool) for p, w in flat.items()}
    return {"masks": masks_at(flat) if begin == 0 else full}

  def update(flat, state, step):
    masks = jax.lax.cond(is_update_step(step), lambda: masks_at(flat),
                         lambda: state["masks"])
    return apply_masks(flat, masks), {"masks": masks}

  def describe(flat, state):
    return {p: storage.Mask(mk, n_m=(n, m)) for p, mk in state["masks"].items()}

  return Method(name or f"{n}:{m}", init=init, update=update, describe=describe, check=check)
