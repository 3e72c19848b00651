"""Symmetric fake-quantization with a straight-through estimator: weights (QAT) and, with a
fixed scale, activations (`activations.py` uses `fake_quant_with_scale` too).

A `bits`-wide symmetric code has 2**bits - 1 levels, -qmax..qmax with
qmax = 2**(bits-1) - 1; the scale is clip / qmax, where clip = clip_ratio * max|w| taken
per output channel (reduced over the kernel's contraction axes, `layout.py`: Dense
[in, out], Conv [h, w, in, out], DenseGeneral with the axes its rule gives) or per tensor.
The forward pass computes with round(clip(w) / scale) * scale; the gradient is the
identity inside [-clip, clip] and zero outside (the STE of Bengio et al. 2013 / Jacob et
al. 2018). The weight scale follows the weights (recomputed inside every step), so the
state is empty and a quantized view is idempotent: quantizing it again gives the same codes.

`weights` takes only the leaves it can store smaller (`accepts`): floating-point leaves
whose every scale covers at least two values. A 0-D scalar (CLIP's `logit_scale`) or a
`[1, d]` / `[1, 1, d]` leaf quantized per channel (a class token) has one value per scale:
its codes would round to +-qmax, the view would equal the weight, and a code plus a
float32 scale per value is larger than the float32 value, so it is left as it is (and
described as skipped). Vectors (biases, LayerNorm scales) are quantized per tensor.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmjax.compress import layout
from mmjax.compress.core import Method

GRANULARITIES = ("channel", "tensor")


def check_bits(bits, where="bits"):
  if not (isinstance(bits, int) and 2 <= bits <= 8):
    raise ValueError(f"{where}={bits!r} must be an integer in 2..8.")
  return bits


def qmax(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def reduce_axes(ndim: int, granularity: str, contract=None, depth: int = 0):
  """Axes a scale is taken over: the contraction axes per channel, all per tensor; never
  the `depth` leading stack axes of stacked layers (`layout.stacked`): scales are per layer."""
  if granularity == "channel" and ndim - depth >= 2:
    return tuple(contract) if contract is not None else tuple(range(depth, ndim - 1))
  return tuple(range(depth, ndim))


def scale_of(w, bits: int, granularity: str = "channel", clip_ratio: float = 1.0,
             contract=None):
  """Float32 scale broadcastable against w (keepdims); never zero. `contract`: the axes
the scale is taken over (`reduce_axes`; for a per-tensor scale, given explicitly, they
leave out the stack axes of stacked layers, as `weights` records them in `scale_axes`)."""
  axes = reduce_axes(w.ndim, granularity, contract)
  if granularity == "tensor" and contract is not None:
    axes = tuple(contract)
  amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=True)
  return jnp.maximum(amax * clip_ratio, 1e-30) / qmax(bits)


def quantize(w, bits: int, granularity: str = "channel", clip_ratio: float = 1.0,
             contract=None):
  """w -> (int8 codes, float32 scale) with w ~= codes * scale."""
  s = scale_of(w, bits, granularity, clip_ratio, contract)
  q = jnp.clip(jnp.round(w.astype(jnp.float32) / s), -qmax(bits), qmax(bits))
  return q.astype(jnp.int8), s


def fake_quant_with_scale(x, scale, bits: int):
  """round(clip(x) / scale) * scale, gradient 1 inside [-c, c] (bounds included), 0 outside."""
  scale = jax.lax.stop_gradient(scale)
  c = scale * qmax(bits)
  inside = jnp.abs(x) <= c
  xc = jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, -c, c)))
  return (xc + jax.lax.stop_gradient(jnp.round(xc / scale) * scale - xc)).astype(x.dtype)


def fake_quant(w, bits: int, granularity: str = "channel", clip_ratio: float = 1.0,
               contract=None):
  """The quantized view of w, with straight-through gradients inside the clip range."""
  return fake_quant_with_scale(w, scale_of(w, bits, granularity, clip_ratio, contract), bits)


def grid_codes(w, scale, bits: int, axes: tuple):
  """The storage record of symmetric codes with `scale` (keepdims over `axes`): one
  vocabulary with the post-training grids, a `formats.Grid` per output column of the
  matrix view whose rows are `axes` (per tensor: every axis; stacked layers: a column per
  layer)."""
  from mmjax.compress import formats, storage
  axes = tuple(int(a) for a in axes)
  scale_m = layout.to_matrix(jnp.broadcast_to(scale.astype(jnp.float32), w.shape), axes)[:1]
  return storage.GridCodes(scale_m, jnp.zeros_like(scale_m),
                           grid=formats.grid("int", bits, granularity="channel"), contract=axes)


def uncompressible(path: str, leaf, granularity: str = "channel", contract=None):
  """Why a leaf (anything with .shape and .dtype) cannot be stored smaller as codes and
  scales, or None when it can."""
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    return f"dtype {leaf.dtype} is not floating point"
  ndim = len(leaf.shape)
  if ndim == 0:
    return "a scalar: one code and one float32 scale are larger than the float32 value"
  if math.prod(leaf.shape) == 0:
    return "an empty array"
  per_scale = math.prod(leaf.shape[a] for a in reduce_axes(
      ndim, granularity, layout.contract_axes(contract, path, ndim),
      layout.depth_axes(contract, path, ndim)))
  if per_scale < 2:
    return (f"shape {tuple(leaf.shape)} gives every {granularity} scale one value: a code "
            "and a float32 scale per value are larger than the float32 value")
  return None


def weights(bits: int = 8, granularity: str = "channel", clip_ratio: float = 1.0, *,
            contract=None, name: str | None = None) -> Method:
  """Fake-quantized weights; `contract` (a `layout` spec) says which axes a channel's scale
  is taken over, per leaf."""
  check_bits(bits)
  if granularity not in GRANULARITIES:
    raise ValueError(f"quantization granularity={granularity!r} is unknown; valid: "
                     f"{', '.join(GRANULARITIES)}.")
  if not 0.0 < float(clip_ratio) <= 1.0:
    raise ValueError(f"quantization clip_ratio={clip_ratio} must be in (0, 1].")

  def axes(path, w):
    return reduce_axes(w.ndim, granularity, layout.contract_axes(contract, path, w.ndim),
                       layout.depth_axes(contract, path, w.ndim))

  def view(flat, state):
    return {p: fake_quant(w, bits, granularity, clip_ratio, axes(p, w)) for p, w in flat.items()}

  def describe(flat, state):
    return {p: grid_codes(w, scale_of(w, bits, granularity, clip_ratio, axes(p, w)), bits,
                          axes(p, w)) for p, w in flat.items()}

  def accepts(path, leaf):
    return uncompressible(path, leaf, granularity, contract)

  return Method(name or f"int{bits}_{granularity}", view=view, describe=describe,
                check=lambda shapes: layout.check(contract, shapes, "quantization"),
                accepts=accepts)
