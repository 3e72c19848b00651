"""Structured pruning: whole attention heads or MLP hidden units, and the physical shrink.

A unit is scored by the squared norm of every weight that belongs to it (a head: its
columns of query/key/value and its rows of `out`; an MLP unit: its column of fc1 and gate
and its row of fc2). Each module keeps the same number of units, round((1 - s) * n), so
that the pruned model is again a model of this codebase: `shrink` slices the kept units
out of every leaf and returns a smaller parameter tree and `ModelConfig` (fewer heads of
the same width, a narrower MLP) whose outputs equal the masked model's.

State: `{"units": {module path: bool [n]}, "key": rng}`; schedules, and masks applied to
the weights in `update` only, as in `pruning`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.compress.core import Transform, flatten, unflatten
from mmjax.compress.pruning import Schedule, check_sparsity
from mmjax.compress.select import top_k_masks

HEAD_PATTERN = r".*/(attn|cross_attn)/(query|key|value|out)/(kernel|bias)"
MLP_PATTERN = r".*/mlp/(fc1|gate|fc2)/(kernel|bias)"

# leaf name -> (axis the units run along, whether it is scored and masked)
_HEAD_LEAVES = {"query/kernel": 1, "key/kernel": 1, "value/kernel": 1, "query/bias": 0,
                "key/bias": 0, "value/bias": 0, "out/kernel": 0}
_MLP_LEAVES = {"fc1/kernel": 1, "gate/kernel": 1, "fc1/bias": 0, "gate/bias": 0,
               "fc2/kernel": 0}


def _modules(paths, unit):
  anchor = "/query/kernel" if unit == "head" else "/fc1/kernel"
  return sorted(p[:-len(anchor)] for p in paths if p.endswith(anchor))


def _leaves(unit):
  return _HEAD_LEAVES if unit == "head" else _MLP_LEAVES


def _unit_count(shapes, module, unit, num_heads):
  if unit == "head":
    return num_heads
  return shapes[f"{module}/fc1/kernel"][-1]


def check_structured(sparsity, unit, shapes: dict, num_heads: int):
  """Config-time checks; returns units kept per module."""
  s = check_sparsity(sparsity, "config.compress.prune.sparsity")
  modules = _modules(shapes, unit)
  if not modules:
    raise ValueError(f"structured pruning of {unit}s: the rule matches no "
                     f"{'attention' if unit == 'head' else 'MLP'} module.")
  n = _unit_count(shapes, modules[0], unit, num_heads)
  keep = n - int(round(s * n))
  if keep < 1:
    raise ValueError(f"config.compress.prune.sparsity={sparsity} would remove every {unit} "
                     f"({n} per module, round({sparsity} * {n}) = {n - keep} removed); "
                     f"the largest valid sparsity is below {(n - 0.5) / n:.3f}.")
  return keep


def _expand(unit_mask, leaf, shape, unit):
  axis = _leaves(unit)[leaf]
  per = shape[axis] // unit_mask.shape[0]
  m = jnp.repeat(unit_mask, per)
  return m[None, :] if (len(shape) == 2 and axis == 1) else (
      m[:, None] if len(shape) == 2 else m)


def units(sparsity: float, unit: str = "head", *, num_heads: int,
          schedule: Schedule = Schedule()) -> Transform:
  target = check_sparsity(sparsity)
  if unit not in ("head", "mlp"):
    raise ValueError(f"structured unit={unit!r} is unknown; valid: head, mlp.")
  schedule.validate()
  leaves = _leaves(unit)

  def scores(flat, module, n):
    total = jnp.zeros((n,), jnp.float32)
    for leaf, axis in leaves.items():
      w = flat.get(f"{module}/{leaf}")
      if w is None:
        continue
      sq = jnp.square(w.astype(jnp.float32))
      per_col = sq.sum(axis=0) if (w.ndim == 2 and axis == 1) else (
          sq.sum(axis=1) if w.ndim == 2 else sq)
      total = total + per_col.reshape(n, -1).sum(axis=1)
    return total

  def unit_masks(flat, s):
    out = {}
    for module in _modules(flat, unit):
      n = num_heads if unit == "head" else flat[f"{module}/fc1/kernel"].shape[-1]
      keep = n - jnp.round(s * n).astype(jnp.int32)
      out[module] = top_k_masks([scores(flat, module, n)], keep)[0]
    return out

  def leaf_masks(flat, umasks):
    masks = {}
    for module, um in umasks.items():
      for leaf in leaves:
        path = f"{module}/{leaf}"
        if path in flat:
          masks[path] = jnp.broadcast_to(_expand(um, leaf, flat[path].shape, unit),
                                         flat[path].shape)
    return masks

  def apply(flat, umasks):
    masks = leaf_masks(flat, umasks)
    return {p: jnp.where(masks[p], w, jnp.zeros((), w.dtype)) if p in masks else w
            for p, w in flat.items()}

  def init(flat, rng):
    return {"units": unit_masks(flat, schedule.sparsity(0, target)), "key": rng}

  def update(flat, state, step):
    um = jax.lax.cond(schedule.is_update_step(step),
                      lambda: unit_masks(flat, schedule.sparsity(step, target)),
                      lambda: state["units"])
    return apply(flat, um), {"units": um, "key": state["key"]}

  def describe(flat, state):
    return {p: {"mask": m, "structured": unit}
            for p, m in leaf_masks(flat, state["units"]).items()}

  return Transform(init, update=update, describe=describe, name=f"{unit}s_{target:g}")


def shrink(view_params, describe: dict, model_cfg):
  """Physically remove pruned heads / MLP units: (smaller params, smaller ModelConfig).

  `view_params` is the masked model's parameter tree, `describe` the plan's description
  (its structured masks say which columns and rows to keep)."""
  flat = {p: np.asarray(w) for p, w in flatten(jax.device_get(view_params)).items()}
  info = {p: d for p, d in jax.device_get(describe).items() if "structured" in d}
  kept = {"head": set(), "mlp": set()}
  out = dict(flat)
  for path, d in info.items():
    unit = d["structured"]
    leaf = "/".join(path.split("/")[-2:])
    axis = _leaves(unit)[leaf]
    mask = np.asarray(d["mask"])
    keep = mask.any(axis=0) if (mask.ndim == 2 and axis == 1) else (
        mask.any(axis=1) if mask.ndim == 2 else mask)
    out[path] = np.compress(keep, flat[path], axis=axis if mask.ndim == 2 else 0)
    kept[unit].add(int(keep.sum()))
  hd = model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads
  changes = {}
  all_paths = list(flat)
  if kept["head"]:
    heads = {k // hd for k in kept["head"]}
    pruned_modules = {p.rsplit("/", 2)[0] for p, d in info.items() if d["structured"] == "head"}
    if len(heads) != 1 or set(_modules(all_paths, "head")) != pruned_modules:
      raise ValueError("a physical shrink needs every attention module pruned to the same "
                       f"number of heads (kept {sorted(heads)} in {len(pruned_modules)} of "
                       f"{len(_modules(all_paths, 'head'))} modules); prune all of them.")
    changes.update(num_heads=heads.pop(), head_dim=hd)
  if kept["mlp"]:
    pruned_modules = {p.rsplit("/", 2)[0] for p, d in info.items() if d["structured"] == "mlp"}
    if len(kept["mlp"]) != 1 or set(_modules(all_paths, "mlp")) != pruned_modules:
      raise ValueError("a physical shrink needs every MLP pruned to the same width "
                       f"(kept {sorted(kept['mlp'])}); prune all of them.")
    changes.update(mlp_dim=kept["mlp"].pop())
  return unflatten(out), dataclasses.replace(model_cfg, **changes).validate()


def save_shrunk(out_dir: str, params, model_cfg) -> int:
  """Write the shrunk model (Orbax params + model.json); returns its parameter count."""
  import json
  import os
  import shutil

  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(out_dir)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "params"), params)
  with open(os.path.join(out_dir, "model.json"), "w") as f:
    json.dump(model_cfg.to_dict(), f, indent=1)
  return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def load_shrunk(out_dir: str):
  """-> (params, ModelConfig) of a model written by `save_shrunk`."""
  import json
  import os

  import orbax.checkpoint as ocp

  from mmjax.models import ModelConfig
  with open(os.path.join(out_dir, "model.json")) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(os.path.abspath(out_dir), "params"))
  return params, cfg
