"""Low-rank factorization: each matched 2-D kernel W [K, N] becomes A [K, r] @ B [r, N],
initialized from the truncated SVD (A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T: the best rank-r
approximation in Frobenius norm, Eckart-Young) and then trained with the model, through
the protocol's trainable state (`trains=True`): the run's optimizer updates A and B.

    from mmjax.compress import lowrank, rules
    plan = Plan(rules([(r".*/mlp/\\w+/kernel", lowrank.factorize(rank=16))], paths))

The rank is static (shapes are fixed under jit): one `rank` for every kernel, or per path
through `ranks` ({path: rank}, e.g. from `ranks_for_energy(params, 0.9)`, which picks for
each kernel the smallest rank keeping that fraction of its squared singular values). The
master kernel stays in the parameters, unused by the forward (which reads A @ B: it gets
no gradient); `describe` states the factors' rank and bytes. (Export as factors, and a
forward computing (x A) B, come with the typed storage records: not yet.)
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mmjax.compress import storage
from mmjax.compress.protocol import TRAINABLE, Method


def _rank(path, rank, ranks):
  r = (ranks or {}).get(path, rank)
  if r is None:
    raise ValueError(f"{path}: no rank given (rank= or ranks[{path!r}]).")
  return int(r)


def check_ranks(shapes: dict, rank=None, ranks=None) -> None:
  """Each kernel 2-D and its rank in [1, min(K, N)]; one line naming the path otherwise."""
  for path, shape in shapes.items():
    if len(shape) != 2:
      raise ValueError(f"{path} has shape {tuple(shape)}; low-rank factorization takes 2-D "
                       "kernels [in, out] (narrow the rule's pattern).")
    r, most = _rank(path, rank, ranks), min(shape)
    if not 1 <= r <= most:
      raise ValueError(f"{path}: rank={r} is outside [1, min(K, N)] = [1, {most}] for its "
                       f"shape {tuple(shape)}.")


def ranks_for_energy(params: dict, energy: float) -> dict:
  """{path: the smallest rank whose singular values keep `energy` of sum(S^2)}, for the
  2-D arrays of `params` ({path: array}); computed on the host, before the plan is built."""
  if not 0.0 < energy <= 1.0:
    raise ValueError(f"energy={energy} must be in (0, 1].")
  out = {}
  for path, w in params.items():
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    kept = np.cumsum(s ** 2) / max(float(np.sum(s ** 2)), 1e-30)
    out[path] = int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(s)))
  return out


def factorize(rank: int | None = None, ranks: dict | None = None,
              name: str | None = None) -> Method:
  """The method: state {"trainable": {path: {"a": [K, r], "b": [r, N]}}}."""

  def init(leaves, rng):
    del rng
    factors = {}
    for path, w in leaves.items():
      r = _rank(path, rank, ranks)
      u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
      root = jnp.sqrt(s[:r])
      factors[path] = {"a": (u[:, :r] * root).astype(w.dtype),
                       "b": (root[:, None] * vt[:r]).astype(w.dtype)}
    return {TRAINABLE: factors}

  def view(leaves, state):
    f = state[TRAINABLE]
    return {p: (f[p]["a"] @ f[p]["b"]).astype(w.dtype) for p, w in leaves.items()}

  def describe(leaves, state):
    f = state[TRAINABLE]
    return {p: storage.Factors(f[p]["a"], f[p]["b"]) for p in leaves}

  def accepts(path, leaf):
    return None if len(leaf.shape) == 2 else f"shape {tuple(leaf.shape)} is not 2-D"

  label = name or (f"lowrank_r{rank}" if rank is not None else "lowrank")
  return Method(label, init=init, view=view, describe=describe, accepts=accepts,
                check=lambda shapes: check_ranks(shapes, rank, ranks), trains=True)

