"""mmjax's units for structured pruning, and the physical shrink into a smaller model.

The unit layouts tell `mmjax.compress.structured.units` what a head and an MLP unit are in
this codebase's models (every projection a 2-D `nn.Dense`, heads as contiguous column
groups of `head_dim`): a head is its columns of query/key/value (and their biases) and its
rows of `out`; an MLP unit its column of fc1 and gate and its row of fc2. `shrink` slices
the kept units out of every leaf and returns a smaller parameter tree and `ModelConfig`
(fewer heads of the same width, a narrower MLP) whose outputs equal the masked model's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np

HEAD_PATTERN = r".*/(attn|cross_attn)/(query|key|value|out)/(kernel|bias)"
MLP_PATTERN = r".*/mlp/(fc1|gate|fc2)/(kernel|bias)"

# leaf name -> the axis its units run along
_HEAD_LEAVES = {"query/kernel": 1, "key/kernel": 1, "value/kernel": 1, "query/bias": 0,
                "key/bias": 0, "value/bias": 0, "out/kernel": 0}
_MLP_LEAVES = {"fc1/kernel": 1, "gate/kernel": 1, "fc1/bias": 0, "gate/bias": 0,
               "fc2/kernel": 0}


def _modules(paths, anchor):
  return sorted(p[:-len(anchor)] for p in paths if p.endswith(anchor))


def _layout(anchor, leaves, count):
  def layout(shapes):
    out = {}
    for module in _modules(shapes, anchor):
      own = {f"{module}/{leaf}": axis for leaf, axis in leaves.items()
             if f"{module}/{leaf}" in shapes}
      out[module] = (count(shapes, module), own)
    return out
  return layout


def head_layout(num_heads: int):
  return _layout("/query/kernel", _HEAD_LEAVES, lambda shapes, module: num_heads)


def mlp_layout():
  return _layout("/fc1/kernel", _MLP_LEAVES,
                 lambda shapes, module: shapes[f"{module}/fc1/kernel"][-1])


def shrink(view_params, describe: dict, model_cfg):
  """Physically remove pruned heads / MLP units: (smaller params, smaller ModelConfig).

  `view_params` is the masked model's parameter tree, `describe` the plan's description
  (its structured masks say which columns and rows to keep)."""
  from mmjax.compress import flatten, unflatten
  flat = {p: np.asarray(w) for p, w in flatten(jax.device_get(view_params)).items()}
  info = {p: d.mask for p, d in jax.device_get(describe).items()
          if d.mask is not None and d.mask.structured}
  kept = {"head": set(), "mlp": set()}
  out = dict(flat)
  for path, d in info.items():
    axis, mask = int(d.unit_axis), np.asarray(d.keep)
    keep = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).any(axis=1)
    out[path] = np.compress(keep, flat[path], axis=axis)
    kept[d.structured].add(int(keep.sum()))
  hd = model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads
  changes = {}
  all_paths = list(flat)
  for unit, anchor in (("head", "/query/kernel"), ("mlp", "/fc1/kernel")):
    if not kept[unit]:
      continue
    pruned = {p.rsplit("/", 2)[0] for p, d in info.items() if d.structured == unit}
    widths = {k // hd for k in kept[unit]} if unit == "head" else kept[unit]
    if len(widths) != 1 or set(_modules(all_paths, anchor)) != pruned:
      what = "attention module" if unit == "head" else "MLP"
      raise ValueError(f"a physical shrink needs every {what} pruned to the same number "
                       f"of {unit} units (kept {sorted(widths)} in {len(pruned)} of "
                       f"{len(_modules(all_paths, anchor))} modules); prune all of them.")
    changes.update(dict(num_heads=widths.pop(), head_dim=hd) if unit == "head"
                   else dict(mlp_dim=widths.pop()))
  return unflatten(out), dataclasses.replace(model_cfg, **changes).validate()


def save_shrunk(out_dir: str, params, model_cfg) -> int:
  """Write the shrunk model (Orbax params + model.json); returns its parameter count."""
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
  import orbax.checkpoint as ocp

  from mmjax.models import ModelConfig
  with open(os.path.join(out_dir, "model.json")) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(os.path.abspath(out_dir), "params"))
  return params, cfg
