"""The Optimal Brain Surgeon update that GPTQ (Frantar et al. 2023) and SparseGPT (Frantar &
Alistarh 2023) share, in JAX: weights are fixed (rounded, or pruned, or both) one input row
at a time and the error of each row is spread over the rows not yet fixed, weighted by the
inverse Hessian of the layer's squared output error, H = XᵀX.

On the matrix view W [K, N] (row k = input feature k; `layout.to_matrix`):

  H += damp * mean(diag H) * I           dead inputs (H_kk = 0) get H_kk = 1 and W_k = 0
  U = chol(H⁻¹)ᵀ                         upper triangular, H⁻¹ = UᵀU
  for each block of B rows (lazy batch updates: B×N rank-1 updates stay in cache, the rest
  of W is updated once per block by one matmul):
    for each row k:  q = target(W_k);  e = (W_k - q) / U_kk;  W_j -= U_kj e  for j > k
    W[after the block] -= U[block, after]ᵀ E

`target` rounds to a `formats.Grid` (GPTQ), zeroes the pruned entries (SparseGPT: the mask
of a block is chosen at its start by W²/U_kk², the OBS saliency, over the whole B×N block
at a uniform rate; N:M picks, per output, the N most salient of every M rows), or both.
Group scales are taken when a group's first row is reached, from its current (updated)
values; with `act_order` (rows in order of decreasing H_kk) group scales are taken from the
weights before any update, so groups stay contiguous in storage (AutoGPTQ's static groups).

Everything is `jit`ted once per kernel shape; `ok` is False when the damped Hessian is not
positive definite (the caller raises, naming the layer and the damping to try).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mmjax.compress.formats import Grid

HI = jax.lax.Precision.HIGHEST


class Result(NamedTuple):
  w: jax.Array       # [K, N] the fixed weights (on the grid, zero where pruned)
  mask: jax.Array    # [K, N] bool, True where kept
  scale: jax.Array   # [G, N] grid scales (ones without a grid)
  zero: jax.Array    # [G, N] zero points
  ok: jax.Array      # bool: the damped Hessian was positive definite


def upper_inverse_cholesky(h, damp):
  """-> (U, ok) with (H + damp·mean(diag H)·I)⁻¹ = UᵀU, U upper triangular."""
  k = h.shape[0]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
  low = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(k, dtype=h.dtype))
  u = jnp.linalg.cholesky(hinv).T
  return u, jnp.all(jnp.isfinite(u))


def _static_scales(grid, w, k):
  s, z = grid.fit(w)
  return grid.expand(s, k), grid.expand(z, k), s, z


@functools.partial(jax.jit, static_argnames=("grid", "sparsity", "n_m", "block",
                                              "act_order"))
def solve(w, h, *, grid: Optional[Grid] = None, sparsity: float = 0.0,
          n_m: Optional[tuple] = None, damp: float = 0.01, block: int = 128,
          act_order: bool = False) -> Result:
  dtype = w.dtype if w.dtype in (jnp.float32, jnp.float64) else jnp.float32
  w, h = w.astype(dtype), h.astype(dtype)
  k, n = w.shape
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(dtype))
  w = jnp.where(dead[:, None], 0.0, w)
  group = grid is not None and grid.granularity == "group"
  g = grid.group_size if group else 1
  m = n_m[1] if n_m else 1
  step = g * m // math.gcd(g, m)
  b = max(step, -(-block // step) * step)  # a multiple of the group and of M
  dynamic_groups = group and not act_order

  perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
  row_scale, row_zero = jnp.ones((k, n), dtype), jnp.zeros((k, n), dtype)
  if grid is None:
    scale, zero = jnp.ones((1, n), dtype), jnp.zeros((1, n), dtype)
  elif dynamic_groups:  # filled as each group's first row is reached
    scale, zero = jnp.ones((-(-k // g), n), dtype), jnp.zeros((-(-k // g), n), dtype)
  else:
    row_scale, row_zero, scale, zero = _static_scales(grid, w, k)
    row_scale, row_zero = row_scale[perm], row_zero[perm]
  w, h = w[perm], h[perm][:, perm]
  u, ok = upper_inverse_cholesky(h, damp)

  kp = -(-k // b) * b  # padded rows: zero weights, identity inverse Hessian, never pruned
  w = jnp.pad(w, ((0, kp - k), (0, 0)))
  u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag(
      jnp.concatenate([jnp.zeros(k, dtype), jnp.ones(kp - k, dtype)]))
  row_scale = jnp.pad(row_scale, ((0, kp - k), (0, 0)), constant_values=1.0)
  row_zero = jnp.pad(row_zero, ((0, kp - k), (0, 0)))
  real = jnp.arange(kp) < k

  def round_row(x, s, z):
    return x if grid is None else grid.round(x, s, z)

  def block_step(bi, carry):
    w, q_all, keep_all, scale, zero = carry
    start = bi * b
    w1 = jax.lax.dynamic_slice(w, (start, 0), (b, n))
    u1 = jax.lax.dynamic_slice(u, (start, start), (b, b))
    d = jnp.diag(u1)
    real1 = jax.lax.dynamic_slice(real, (start,), (b,))
    keep1 = jnp.ones((b, n), bool)
    if sparsity and not n_m:  # the block's mask, by OBS saliency, at a uniform rate
      sal = jnp.where(real1[:, None], w1 ** 2 / (d[:, None] ** 2), jnp.inf).reshape(-1)
      n_prune = jnp.round(sparsity * jnp.sum(real1) * n).astype(jnp.int32)
      rank = jnp.zeros(b * n, jnp.int32).at[jnp.argsort(sal, stable=True)].set(
          jnp.arange(b * n, dtype=jnp.int32))
      keep1 = (rank >= n_prune).reshape(b, n)
    rs1 = jax.lax.dynamic_slice(row_scale, (start, 0), (b, n))
    rz1 = jax.lax.dynamic_slice(row_zero, (start, 0), (b, n))
    after = jnp.arange(b)

    def row_step(i, c):
      w1, q1, e1, keep1, s, z, scale, zero = c
      if n_m:  # N:M: of rows i..i+M, keep per output the N of highest saliency
        nn_, mm_ = n_m
        rows = jax.lax.dynamic_slice(w1, (i, 0), (mm_, n))
        dd = jax.lax.dynamic_slice(d, (i,), (mm_,))
        sal = rows ** 2 / dd[:, None] ** 2
        rank = jnp.argsort(jnp.argsort(sal, axis=0, stable=True), axis=0, stable=True)
        new = rank >= (mm_ - nn_)
        old = jax.lax.dynamic_slice(keep1, (i, 0), (mm_, n))
        keep1 = jax.lax.dynamic_update_slice(keep1, jnp.where(i % mm_ == 0, new, old),
                                             (i, 0))
      if dynamic_groups:
        gs, gz = grid.fit(jax.lax.dynamic_slice(w1, (i - i % g, 0), (g, n)))
        first = (i % g == 0) & (start + i < k)  # padded rows hold no group
        s = jnp.where(first, gs[0], s)
        z = jnp.where(first, gz[0], z)
        gi = (start + i) // g
        scale = jnp.where(first, jax.lax.dynamic_update_slice(scale, gs, (gi, 0)), scale)
        zero = jnp.where(first, jax.lax.dynamic_update_slice(zero, gz, (gi, 0)), zero)
        rs, rz = s, z
      else:
        rs, rz = rs1[i], rz1[i]
      x = w1[i]
      kp_ = keep1[i]
      q = jnp.where(kp_, round_row(x, rs, rz), 0.0)
      e = (x - q) / d[i]
      w1 = w1 - jnp.where((after > i)[:, None], jnp.outer(u1[i], e), 0.0)
      return (w1, q1.at[i].set(q), e1.at[i].set(e), keep1, s, z, scale, zero)

    s0 = jnp.ones((n,), dtype)
    z0 = jnp.zeros((n,), dtype)
    init = (w1, jnp.zeros((b, n), dtype), jnp.zeros((b, n), dtype), keep1, s0, z0, scale,
            zero)
    w1, q1, e1, keep1, _, _, scale, zero = jax.lax.fori_loop(0, b, row_step, init)
    u_rows = jax.lax.dynamic_slice(u, (start, 0), (b, kp))  # U[block, :]
    later = (jnp.arange(kp) >= start + b)[:, None]
    w = w - jnp.where(later, jnp.matmul(u_rows.T, e1, precision=HI), 0.0)
    q_all = jax.lax.dynamic_update_slice(q_all, q1, (start, 0))
    keep_all = jax.lax.dynamic_update_slice(keep_all, keep1, (start, 0))
    return w, q_all, keep_all, scale, zero

  carry = (w, jnp.zeros((kp, n), dtype), jnp.ones((kp, n), bool), scale, zero)
  _, q, keep, scale, zero = jax.lax.fori_loop(0, kp // b, block_step, carry)
  inv = jnp.argsort(perm)
  q, keep = q[:k][inv], keep[:k][inv]
  return Result(q, keep, scale, zero, ok)
