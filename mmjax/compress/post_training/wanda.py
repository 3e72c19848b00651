"""Wanda (Sun et al. 2024): prune by |W| · ‖X‖₂, comparing weights within each output.

The score of weight (k, j) is |W_kj| times the L2 norm of input feature k over the
calibration tokens (the square root of `stats.sq`); each output column keeps its highest
scores (unstructured: the same fraction per output; N:M: N of every M consecutive inputs).
No weight is updated: Wanda is one pass, no Hessian.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def scores(w, sq):
  """w [K, N], sq [K] (Σ x² per input) -> |w| · ‖x_k‖₂."""
  return jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(sq.astype(jnp.float32))[:, None]


@jax.jit
def _ranks_per_column(s):
  return jnp.argsort(jnp.argsort(s, axis=0, stable=True), axis=0, stable=True)


def prune(w, sq, sparsity: float, n_m: tuple | None = None):
  """-> keep mask [K, N]."""
  s = scores(w, sq)
  k, n = s.shape
  if n_m:
  # ranks within each group of M rows, per column
    nn_, mm_ = n_m
    r = _ranks_per_column(s.reshape(k // mm_, mm_, n).transpose(1, 0, 2).reshape(mm_, -1))
    return (r >= mm_ - nn_).reshape(mm_, k // mm_, n).transpose(1, 0, 2).reshape(k, n)
  return _ranks_per_column(s) >= int(round(sparsity * k))


def method(sparsity: float = 0.5, *, n_m: tuple | None = None, mode: str = "sequential",
           contract=None, name: str | None = None):
  from mmjax.compress.post_training import method as pt
  from mmjax.compress.pruning import check_sparsity
  if n_m is not None:
    n, m = n_m
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
      raise ValueError(f"N:M pruning needs integers 1 <= N < M, got N={n}, M={m}.")
  sparsity = 0.0 if n_m else check_sparsity(sparsity)

  def solve(path, w, st):
    keep = prune(w, st["sq"], sparsity, n_m)
    return pt.Solved(jnp.where(keep, w, 0.0).astype(w.dtype), mask=keep)

  what = f"{n_m[0]}of{n_m[1]}" if n_m else f"{sparsity:g}"
  return pt.build(name or f"wanda_{what}", solve, ("sq",), masks=True, n_m=n_m, mode=mode,
                  contract=contract)
