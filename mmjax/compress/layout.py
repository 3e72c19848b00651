"""Which axes of a kernel are contracted (inputs) and which are outputs.

Masks of N:M groups run along the contracted axes, per-channel quantization scales are per
output feature. A 2-D Dense kernel is `[in, out]` and a conv kernel `[h, w, in, out]`: the
default, every axis but the last contracted, is right for both. Flax's `DenseGeneral`
kernels need the rule to say: `nn.MultiHeadDotProductAttention`'s query/key/value are
`[in, heads, head_dim]` (contract axis 0) and its out projection `[heads, head_dim, out]`
(contract axes 0 and 1); `FLAX_ATTENTION` says so. A spec is None (the default), a tuple
of axes for every matched leaf, or {regex: axes} (first full match, else the default).
"""
from __future__ import annotations

import re

import jax.numpy as jnp

FLAX_ATTENTION = {r".*/(query|key|value)/kernel": (0,), r".*/out/kernel": (0, 1)}


def contract_axes(spec, path: str, ndim: int) -> tuple:
  if isinstance(spec, dict):
    for pattern, axes in spec.items():
      if re.fullmatch(pattern, path):
        return contract_axes(tuple(axes), path, ndim)
    spec = None
  if spec is None:
    return tuple(range(ndim - 1))
  return tuple(sorted(a % ndim for a in spec))


def output_axes(spec, path: str, ndim: int) -> tuple:
  c = contract_axes(spec, path, ndim)
  return tuple(a for a in range(ndim) if a not in c)


def check(spec, shapes: dict, what: str):
  """Every axis exists in its kernel, none twice, and some output axis remains."""
  for path, shape in shapes.items():
    ndim = len(shape)
    raw = spec
    if isinstance(spec, dict):
      raw = next((tuple(a) for p, a in spec.items() if re.fullmatch(p, path)), None)
    if raw is None:
      continue
    bad = [a for a in raw if not -ndim <= int(a) < ndim]
    if bad or len({a % ndim for a in raw}) != len(raw) or len(raw) >= ndim:
      raise ValueError(f"{what}: contraction axes {tuple(raw)} do not fit {path} of shape "
                       f"{tuple(shape)} (valid: distinct axes in -{ndim}..{ndim - 1}, leaving "
                       "at least one output axis).")


def to_matrix(w, contract: tuple):
  """w -> [K, N]: the contracted axes (ascending) flattened into rows, the rest into
  columns. The post-training methods work on this view: row i is input feature i, in the
  order the calibration statistics (`post_training.stats`) use."""
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
