"""Exact top-k masks without sorting: bisection over the bit patterns of the scores.

For non-negative float32 scores the uint32 bit pattern orders exactly as the value, so the
k-th largest score is found by 31 rounds of "how many are >= t?" (one compare-and-sum pass
over the scores each, fused by XLA, no sort, no gather), across any number of arrays at
once (global pruning needs no concatenation). Ties at the threshold are broken by position,
so a mask keeps exactly k elements: realized sparsity equals the target, also when many
scores are equal (weights an earlier step already pruned are all exactly zero).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _bits(score):
  return jax.lax.bitcast_convert_type(jnp.abs(score).astype(jnp.float32), jnp.uint32)


def top_k_masks(scores: list, keep) -> list:
  """Boolean masks keeping exactly the `keep` largest of all `scores` (a list of arrays of
  non-negative values, ranked together); `keep` may be traced."""
  bits = [_bits(s) for s in scores]
  keep = jnp.asarray(keep, jnp.int32)

  def count_ge(t):
    return sum(jnp.sum(b >= t, dtype=jnp.int32) for b in bits)

  def body(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = count_ge(mid) >= keep
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  # invariant: count(>= lo) >= keep > count(>= hi); 2**31 exceeds every finite |x|'s bits
  lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.uint32(0), jnp.uint32(2**31)))
  above = [b > lo for b in bits]
  room = keep - sum(jnp.sum(a, dtype=jnp.int32) for a in above)  # ties at lo still to keep
  masks, offset = [], jnp.int32(0)
  for b, a in zip(bits, above):
    eq = (b == lo).reshape(-1)
    rank = jnp.cumsum(eq, dtype=jnp.int32) + offset  # 1-based rank among ties, in order
    masks.append(a | (eq & (rank <= room)).reshape(b.shape))
    offset = offset + jnp.sum(eq, dtype=jnp.int32)
  return [jnp.where(keep > 0, m, False) for m in masks]


def n_m_mask(score, n: int, m: int, contract=None):
  """Keep the n largest of every m consecutive entries along the contraction axes
  (`contract`, default every axis but the last, flattened in order: a [in, out] kernel
  groups along `in`, a conv kernel [h, w, in, out] along h*w*in). Ties by position."""
  shape = score.shape
  contract = tuple(range(score.ndim - 1)) if contract is None else tuple(contract)
  rest = tuple(a for a in range(score.ndim) if a not in contract)
  s = jnp.transpose(jnp.abs(score), contract + rest)
  moved = s.shape
  s = s.reshape(-1, max(1, int(np.prod([shape[a] for a in rest]))))
  rows = s.shape[0]
  g = s.reshape(rows // m, m, s.shape[-1])
  a, b = g[:, :, None, :], g[:, None, :, :]  # [groups, i, j, out]
  idx = jnp.arange(m)
  before = (idx[None, :] < idx[:, None])[None, :, :, None]  # j precedes i
  rank = jnp.sum((b > a) | ((b == a) & before), axis=2)  # how many beat entry i
  keep = (rank < n).reshape(moved)
  return jnp.transpose(keep, np.argsort(contract + rest))
