"""Which axes of a kernel are contracted (inputs) and which are outputs.

Masks of N:M groups run along the contracted axes, per-channel quantization scales are per
output feature. A 2-D Dense kernel is `[in, out]` and a conv kernel `[h, w, in, out]`: the
default, every axis but the last contracted, is right for both. Flax's `DenseGeneral`
kernels need the rule to say: `nn.MultiHeadDotProductAttention`'s query/key/value are
`[in, heads, head_dim]` (contract axis -3) and its out projection `[heads, head_dim, out]`
(contract axes -3 and -2); `FLAX_ATTENTION` says so. A spec is None (the default), a tuple
of axes for every matched leaf, or {regex: axes} (first full match, else the default).
Axes may be negative, counted from the end: that is what makes one spec right for a layer's
kernel and for the same kernel with leading axes in front. The resolved axes are always
non-negative (what descriptions, checkpoints and exports record), so specs written with
negative axes give the same numbers as their non-negative twins on unstacked kernels.

Stacked layers. Models that scan over their layers (`nn.scan`, `nnx.scan`, MaxText,
big_vision's `scan=True`) store each parameter with leading depth axes: `[depth, in, out]`,
`[depth, in, heads, head_dim]`. The shape alone cannot say whether a 4-D leaf is a conv
kernel or a stacked 3-D kernel, so the stack is declared, not guessed:
`stacked(spec, depth_axes=1)` is `spec` applied to each layer's kernel (axes counted within
the layer: the default then contracts every axis of a layer but its last), the leading
`depth_axes` never contracted and never sharing a scale (every scale, per channel or per
tensor, is per layer). It can stand for the whole spec or for one entry of a dict
(`{r"encoder/.*": layout.stacked(None), r"head/kernel": None}`). Calibrating methods also
see the stack in the traced forward (the scan slices it) and refuse a spec that does not
declare it, naming the leaf and this fix; weight-only methods, which never trace the
forward, rely on the declaration.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax.numpy as jnp

FLAX_ATTENTION = {r".*/(query|key|value)/kernel": (-3,), r".*/out/kernel": (-3, -2)}


class Stacked(NamedTuple):
  """`spec` applied to each layer of a kernel with `depth` leading stack axes."""
  spec: Any
  depth: int


def stacked(spec=None, depth_axes: int = 1) -> Stacked:
  """The layout of kernels stacked along `depth_axes` leading axes (see the docstring)."""
  if not (isinstance(depth_axes, int) and depth_axes >= 1):
    raise ValueError(f"layout.stacked: depth_axes={depth_axes!r} must be a positive integer "
                     "(the number of leading stack axes, 1 for one nn.scan).")
  return Stacked(spec, depth_axes)


def _entry(spec, path: str):
  """-> (stack depth, the axes that apply to `path` or None for the default)."""
  depth = 0
  while True:
    if isinstance(spec, Stacked):
      depth, spec = depth + spec.depth, spec.spec
    elif isinstance(spec, dict):
      spec = next((a for p, a in spec.items() if re.fullmatch(p, path)), None)
    else:
      return depth, (None if spec is None else tuple(spec))


def depth_axes(spec, path: str, ndim: int = 0) -> int:
  """How many leading stack axes `spec` gives the leaf at `path` (0: not stacked)."""
  return _entry(spec, path)[0]


def contract_axes(spec, path: str, ndim: int) -> tuple:
  depth, axes = _entry(spec, path)
  n = ndim - depth
  if axes is None:
    return tuple(range(depth, depth + n - 1))
  return tuple(sorted(depth + a % n for a in axes))


def output_axes(spec, path: str, ndim: int) -> tuple:
  c = contract_axes(spec, path, ndim)
  return tuple(a for a in range(ndim) if a not in c)


def check(spec, shapes: dict, what: str):
  """Every axis exists in its (layer's) kernel, none twice, and some output axis remains;
  a stacked leaf keeps at least one axis per layer."""
  for path, shape in shapes.items():
    ndim = len(shape)
    depth, raw = _entry(spec, path)
    n = ndim - depth
    layer = f" (each layer's kernel, after {depth} stack axes, is {tuple(shape[depth:])})"
    if depth and n < 1:
      raise ValueError(f"{what}: {path} of shape {tuple(shape)} has no axes left after the "
                       f"{depth} stack axes of layout.stacked; give it depth_axes < {ndim}, or "
                       "leave it out of the rule.")
    if raw is None:
      continue
    bad = [a for a in raw if not -n <= int(a) < n]
    if bad or len({a % n for a in raw}) != len(raw) or len(raw) >= n:
      raise ValueError(f"{what}: contraction axes {tuple(raw)} do not fit {path} of shape "
                       f"{tuple(shape)}{layer if depth else ''} (valid: distinct axes in "
                       f"-{n}..{n - 1}, leaving at least one output axis).")


def to_matrix(w, contract: tuple):
  """w -> [K, N]: the contracted axes (ascending) flattened into rows, the rest into
  columns. The post-training methods work on this view: row i is input feature i, in the
  order the calibration statistics (`post_training.stats`) use. For a stacked kernel the
  stack axes lead the columns: column l * N + j is output j of layer l."""
  out = [a for a in range(w.ndim) if a not in contract]
  k = 1
  for a in contract:
    k *= w.shape[a]
  return jnp.transpose(w, tuple(contract) + tuple(out)).reshape(k, -1)


def from_matrix(m, shape: tuple, contract: tuple):
  """The inverse of `to_matrix` for a kernel of `shape`."""
  out = [a for a in range(len(shape)) if a not in contract]
  order = tuple(contract) + tuple(out)
  t = m.reshape(tuple(shape[a] for a in order))
  return jnp.transpose(t, tuple(order.index(a) for a in range(len(shape))))
