"""Symmetric fake-quantization of weights (QAT) with a straight-through estimator.

A `bits`-wide symmetric code has 2**bits - 1 levels, -qmax..qmax with
qmax = 2**(bits-1) - 1; the scale is clip / qmax, where clip = clip_ratio * max|w| taken
per output channel (the last axis: Dense [in, out], Conv [h, w, in, out], Embed
[vocab, d]) or per tensor. The forward pass computes with round(clip(w) / scale) * scale;
the gradient is the identity inside [-clip, clip] and zero outside (the STE of
Bengio et al. 2013 / Jacob et al. 2018). With clip_ratio = 1 nothing is clipped. The
scale follows the weights (recomputed inside every step), so the state is empty and a
quantized view is idempotent: quantizing it again gives the same codes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.compress.core import Transform

GRANULARITIES = ("channel", "tensor")


def check_bits(bits, where="bits"):
  if not (isinstance(bits, int) and 2 <= bits <= 8):
    raise ValueError(f"{where}={bits!r} must be an integer in 2..8.")
  return bits


def qmax(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def _reduce_axes(w, granularity):
  return tuple(range(w.ndim - 1)) if granularity == "channel" and w.ndim >= 2 else None


def scale_of(w, bits: int, granularity: str = "channel", clip_ratio: float = 1.0):
  """Per-channel (shape [out]) or per-tensor (scalar) float32 scale; never zero."""
  amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=_reduce_axes(w, granularity))
  return jnp.maximum(amax * clip_ratio, 1e-30) / qmax(bits)


def quantize(w, bits: int, granularity: str = "channel", clip_ratio: float = 1.0):
  """w -> (int8 codes, float32 scale) with w ~= codes * scale."""
  s = scale_of(w, bits, granularity, clip_ratio)
  q = jnp.clip(jnp.round(w.astype(jnp.float32) / s), -qmax(bits), qmax(bits))
  return q.astype(jnp.int8), s


def fake_quant(w, bits: int, granularity: str = "channel", clip_ratio: float = 1.0):
  """The quantized view of w, with straight-through gradients inside the clip range."""
  s = jax.lax.stop_gradient(scale_of(w, bits, granularity, clip_ratio))
  c = s * qmax(bits)
  inside = jnp.abs(w) <= c  # gradient 1 inside [-c, c] (bounds included), 0 outside
  wc = jnp.where(inside, w, jax.lax.stop_gradient(jnp.clip(w, -c, c)))
  q = jnp.round(wc / s) * s
  return (wc + jax.lax.stop_gradient(q - wc)).astype(w.dtype)


def weights(bits: int = 8, granularity: str = "channel", clip_ratio: float = 1.0) -> Transform:
  check_bits(bits)
  if granularity not in GRANULARITIES:
    raise ValueError(f"quantization granularity={granularity!r} is unknown; valid: "
                     f"{', '.join(GRANULARITIES)}.")
  if not 0.0 < float(clip_ratio) <= 1.0:
    raise ValueError(f"quantization clip_ratio={clip_ratio} must be in (0, 1].")

  def forward(flat, state):
    return {p: fake_quant(w, bits, granularity, clip_ratio) for p, w in flat.items()}

  def describe(flat, state):
    return {p: {"bits": bits, "granularity": granularity, "clip_ratio": clip_ratio}
            for p in flat}

  return Transform(init=lambda flat, rng: {}, forward=forward, describe=describe,
                   name=f"int{bits}_{granularity}")
