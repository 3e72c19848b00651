"""AWQ (Lin et al. 2024): scale salient input channels up before rounding, down after.

Input channel k gets s_k = mean|x_k|^α (normalized so max·min = 1); the kernel is stored as
Q(diag(s) W) and computes with Ŵ = diag(s)⁻¹ Q(diag(s) W), so before rounding the model's
function is unchanged, and channels that carry large activations round with relatively
finer steps. α is grid-searched in [0, 1] per layer to minimize the layer's output error on
the calibration data, ‖X W − X Ŵ‖² = tr(ΔᵀHΔ) with Δ = W − Ŵ and H = XᵀX, which the Gram
matrix gives without keeping X. (The paper measures the error of the whole block's output
and also searches clipping ranges; this per-layer objective is what a model-agnostic
interceptor can see. α = 0 is round-to-nearest, so the search never does worse than RTN on
the calibration data.)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmjax.compress.formats import Grid

HI = jax.lax.Precision.HIGHEST


class Result(NamedTuple):
  w: jax.Array         # [K, N] Ŵ, what the layer computes with
  in_scale: jax.Array  # [K] s
  scale: jax.Array     # [G, N] grid scales of diag(s) W
  zero: jax.Array
  alpha: jax.Array


def channel_scales(absmean, alpha):
  s = jnp.maximum(absmean.astype(jnp.float32), 1e-4) ** alpha
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def quantized(w, s, grid: Grid):
  ws = w * s[:, None]
  scale, zero = grid.fit(ws)
  return grid.round_matrix(ws, scale, zero) / s[:, None], scale, zero


@functools.partial(jax.jit, static_argnames=("grid", "n_grid"))
def search(w, h, absmean, grid: Grid, n_grid: int = 20) -> Result:
  w = w.astype(jnp.float32)
  alphas = jnp.arange(n_grid + 1, dtype=jnp.float32) / n_grid

  def err(alpha):
    wq, _, _ = quantized(w, channel_scales(absmean, alpha), grid)
    d = w - wq
    return jnp.sum(jnp.matmul(h, d, precision=HI) * d)

  errs = jax.lax.map(err, alphas)
  best = alphas[jnp.argmin(errs)]
  s = channel_scales(absmean, best)
  wq, scale, zero = quantized(w, s, grid)
  return Result(wq, s, scale, zero, best)


def method(grid, *, n_grid: int = 20, mode: str = "sequential", contract=None,
           name: str | None = None, balance: str = "none"):
  """`balance`: the search's error and the activation magnitudes weigh tokens by
  sensitivity (`row_weights`: MBQ's modality weights, or per token)."""
  from mmjax.compress.post_training import method as pt
  if not (isinstance(n_grid, int) and n_grid >= 1):
    raise ValueError(f"AWQ n_grid={n_grid!r} must be a positive integer.")

  of = pt.grid_map(grid)

  def solve(path, w, st):
    r = search(w, st["gram"], st["absmean"], of(path), n_grid)
    return pt.Solved(r.w, scale=r.scale, zero=r.zero, in_scale=r.in_scale)

  return pt.build(name or f"awq_{pt.grid_name(grid)}", solve, ("gram", "absmean"), grid=grid,
                  mode=mode, contract=contract, in_scales=True, balance=balance)
