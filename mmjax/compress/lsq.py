"""LSQ, learned step size quantization (Esser et al., ICLR 2020): fake-quantized weights
whose step size s (one per output channel, or per tensor) is a trainable parameter, trained
with the model by the run's optimizer (the protocol's `trains=True`).

    w_q = s * round(clip(w / s, -Q, Q))          Q = 2**(bits - 1) - 1 (symmetric grid)

Gradients: straight-through for round (so dw_q/dw = 1 inside the range, 0 outside), and
for s the paper's d w_q / d s = round(v) - v inside, -Q or Q outside (v = w / s), scaled by
g = 1 / sqrt(n * Q), n the weights per step size, so that s learns at the weights' pace.
Initialized at 2 mean|w| / sqrt(Q), as the paper does. Compared with min-max QAT
(`quant.weights`: s = max|w| / Q, not learned), the clip range is learned: at 2 and 3 bits
clipping the outliers is what pays.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmjax.compress import layout
from mmjax.compress.protocol import TRAINABLE, Method
from mmjax.compress.quant import (GRANULARITIES, check_bits, grid_codes, qmax, reduce_axes,
                                  uncompressible)


def _scaled_grad(x, g):
  """x in the forward, g * dL/dx in the backward."""
  return x * g + jax.lax.stop_gradient(x - x * g)


def _round_ste(x):
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def quantize(w, s, bits: int, axes):
  """LSQ's fake quantization of `w` with step sizes `s` (shaped to broadcast over `axes`)."""
  q = qmax(bits)
  n = math.prod(w.shape[a] for a in axes) if axes else w.size
  s = _scaled_grad(jnp.maximum(s, 1e-8), 1.0 / math.sqrt(n * q))
  return (_round_ste(jnp.clip(w / s, -q, q)) * s).astype(w.dtype)


def lsq(bits: int = 4, granularity: str = "channel", *, contract=None,
        name: str | None = None) -> Method:
  """State {"trainable": {path: step sizes, shaped like max|w| over the scale axes}}."""
  check_bits(bits)
  if granularity not in GRANULARITIES:
    raise ValueError(f"LSQ granularity={granularity!r} is unknown; valid: "
                     f"{', '.join(GRANULARITIES)}.")

  def axes(path, w):
    return reduce_axes(w.ndim, granularity, layout.contract_axes(contract, path, w.ndim),
                       layout.depth_axes(contract, path, w.ndim))

  def init(leaves, rng):
    del rng
    return {TRAINABLE: {p: (2.0 * jnp.mean(jnp.abs(w.astype(jnp.float32)), axis=axes(p, w),
                                           keepdims=True) / math.sqrt(qmax(bits))
                            ).astype(jnp.float32)
                        for p, w in leaves.items()}}

  def view(leaves, state):
    return {p: quantize(w, state[TRAINABLE][p], bits, axes(p, w)) for p, w in leaves.items()}

  def describe(leaves, state):
    return {p: grid_codes(w, jnp.maximum(state[TRAINABLE][p], 1e-8), bits, axes(p, w))
            for p, w in leaves.items()}

  def accepts(path, leaf):
    return uncompressible(path, leaf, granularity, contract)

  return Method(name or f"lsq{bits}_{granularity}", init=init, view=view, describe=describe,
                accepts=accepts, trains=True,
                check=lambda shapes: layout.check(contract, shapes, "quantization"))
