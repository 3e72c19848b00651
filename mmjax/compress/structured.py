"""Structured pruning: whole units (attention heads, MLP hidden units, channels) at once.

A model says what its units are through a *unit layout*, a function
`layout(shapes) -> {module: (units, {leaf path: axis})}`: each module has `units` units,
and unit k of a leaf is the k-th of `units` equal slices along its axis. mmjax's layout
(heads of q/k/v/out, MLP units of fc1/gate/fc2) and the physical shrink into a smaller
`ModelConfig` live beside the models (`mmjax/models/structure.py`); a foreign model passes
its own layout. A unit is scored by the squared norm of all its slices; every module
keeps the same number of units, round((1 - s) * n), so the pruned model is again a model
of the same family with fewer units.

State: `{"units": {module: bool [n]}, "key": rng}`; the sparsity ramp, and masks applied to the
weights in `update` only (`pruning.apply_masks`), as in `pruning`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.compress import storage
from mmjax.compress.core import Method
from mmjax.compress.pruning import Ramp, apply_masks, check_sparsity
from mmjax.compress.select import top_k_masks


def keep_count(sparsity, units: int, what: str = "unit") -> int:
  """Units kept per module; removing every unit is an error."""
  s = check_sparsity(sparsity, "config.compress.prune.sparsity")
  keep = units - int(round(s * units))
  if keep < 1:
    raise ValueError(f"config.compress.prune.sparsity={sparsity} would remove every {what} "
                     f"({units} per module, round({sparsity} * {units}) = {units - keep} "
                     f"removed); the largest valid sparsity is below {(units - 0.5) / units:.3f}.")
  return keep


def _slices(w, axis, n):
  """w with its `axis` split into [n, per] and moved to the front: [n, per, ...rest]."""
  w = jnp.moveaxis(w, axis, 0)
  return w.reshape((n, w.shape[0] // n) + w.shape[1:])


def leaf_mask(unit_mask, shape, axis):
  n = unit_mask.shape[0]
  m = jnp.repeat(unit_mask, shape[axis] // n)
  return jnp.broadcast_to(jnp.expand_dims(m, [a for a in range(len(shape)) if a != axis]),
                          shape)


def units(sparsity: float, layout, *, what: str = "unit", ramp: Ramp = Ramp(),
          name: str | None = None) -> Method:
  target = check_sparsity(sparsity)
  ramp.validate()

  def modules(flat):
    return layout({p: tuple(w.shape) for p, w in flat.items()})

  def check(shapes):
    mods = layout(shapes)
    if not mods:
      raise ValueError(f"structured pruning of {what}s: the rule matches no module with "
                       f"{what}s (its layout found none among {sorted(shapes)[:4]}...).")
    for module, (n, leaves) in mods.items():
      keep_count(target, n, what)
      for path, axis in leaves.items():
        if shapes[path][axis] % n:
          raise ValueError(f"{path} (shape {shapes[path]}) has {shapes[path][axis]} entries "
                           f"along axis {axis}, not a multiple of its {n} {what}s.")

  def unit_masks(flat, s):
    out = {}
    for module, (n, leaves) in modules(flat).items():
      score = jnp.zeros((n,), jnp.float32)
      for path, axis in leaves.items():
        sq = jnp.square(_slices(flat[path].astype(jnp.float32), axis, n))
        score = score + sq.reshape(n, -1).sum(axis=1)
      keep = n - jnp.round(s * n).astype(jnp.int32)
      out[module] = top_k_masks([score], keep)[0]
    return out

  def leaf_masks(flat, umasks):
    masks = {}
    for module, (n, leaves) in modules(flat).items():
      for path, axis in leaves.items():
        masks[path] = leaf_mask(umasks[module], flat[path].shape, axis)
    return masks

  def init(flat, rng):
    return {"units": unit_masks(flat, ramp.sparsity(0, target)), "key": rng}

  def update(flat, state, step):
    um = jax.lax.cond(ramp.is_update_step(step),
                      lambda: unit_masks(flat, ramp.sparsity(step, target)),
                      lambda: state["units"])
    return apply_masks(flat, leaf_masks(flat, um)), {"units": um, "key": state["key"]}

  def describe(flat, state):
    axes = {p: a for _, (_, leaves) in modules(flat).items() for p, a in leaves.items()}
    return {p: storage.Mask(m, structured=what, unit_axis=axes[p])
            for p, m in leaf_masks(flat, state["units"]).items()}

  return Method(name or f"{what}s_{target:g}", init=init, update=update, describe=describe,
                check=check)
