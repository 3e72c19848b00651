"""Layer statistics of the calibration batches, for any model: the inputs X [T, K] of the
products that consume each selected weight, seen through `intercept`.

  gram     XᵀX [K, K] summed over tokens (GPTQ, SparseGPT; AWQ scores its scales with it)
  sq       Σ x² per input channel [K] (Wanda's ‖X_k‖₂², the Gram's diagonal without the Gram)
  absmean  Σ |x| per input channel [K] (AWQ's activation magnitude), divided by `count`
  amax     max |x| per input channel [K] (SmoothQuant)
  count    rows T seen (tokens, over every use of the weight)

X's rows are every position of every example (the product's free axes) and its columns the
contracted axes in the order of `layout.to_matrix` (the weight's contracted axes,
ascending), so `gram` pairs with the weight's matrix view row for row. One jitted program
per set of paths computes every statistic of a batch; under a mesh the batch is sharded
and the sums are all-reduced by XLA (tested: 8 devices give the 1-device statistics).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mmjax.compress import intercept, layout

STATS = ("gram", "sq", "absmean", "amax")


def rows(d: intercept.Dot, contract: tuple):
  """The product's activation as X [T, K], K ordered like the weight's matrix view."""
  (lc, rc), (lb, rb) = d.dims
  if lb or rb:
    raise ValueError(f"post-training statistics: {d.path} is consumed by a batched "
                     "dot_general (batch dims), which has no single input matrix; narrow "
                     "the rule to Dense-like kernels.")
  wc, xc = d.w_contract(), d.x_contract()
  if tuple(sorted(wc)) != tuple(contract):
    raise ValueError(f"post-training: {d.path} is contracted over axes {tuple(sorted(wc))} "
                     f"by the model but the rule says {tuple(contract)}; pass "
                     f"contract={{r'{d.path}': {tuple(sorted(wc))}}} to the method.")
  order = [xc[i] for i in sorted(range(len(wc)), key=lambda i: wc[i])]
  free = [a for a in range(d.x.ndim) if a not in xc]
  x = jnp.transpose(d.x.astype(jnp.float32), tuple(free) + tuple(order))
  k = 1
  for a in order:
    k *= d.x.shape[a]
  return x.reshape(-1, k)


def of(x, wanted):
  out = {"count": jnp.float32(x.shape[0])}
  if "gram" in wanted:
    out["gram"] = jnp.einsum("tk,tl->kl", x, x, precision=jax.lax.Precision.HIGHEST)
  if "sq" in wanted:
    out["sq"] = jnp.sum(x * x, axis=0)
  if "absmean" in wanted:
    out["absmean"] = jnp.sum(jnp.abs(x), axis=0)
  if "amax" in wanted:
    out["amax"] = jnp.max(jnp.abs(x), axis=0)
  return out


def merge(a, b):
  return {k: (jnp.maximum(a[k], b[k]) if k == "amax" else a[k] + b[k]) for k in a}


def program(apply_fn: Callable, paths: Sequence[str], wanted: Sequence[str],
            contract_of: Callable[[str, int], tuple]):
  """-> (jitted f(params, batch) -> {path: stats}, order): every path's statistics from
  one forward; `order` lists the paths in the order the forward consumes them (filled when
  f is first traced). Sequential calibration cuts the forward instead (`staged`)."""
  check(wanted)
  order = []

  def f(params, batch):
    stat = lambda d: of(rows(d, contract_of(d.path, d.w.ndim)), wanted)
    seen = intercept.observe(apply_fn, list(paths), stat)(params, batch)
    order[:] = list(seen)
    return {path: merge_uses(uses) for path, uses in seen.items()}

  return jax.jit(f), order


def check(wanted):
  bad = sorted(set(wanted) - set(STATS))
  if bad:
    raise ValueError(f"unknown statistics {bad}; valid: {', '.join(STATS)}.")


def merge_uses(uses):
  acc = uses[0]
  for u in uses[1:]:
    acc = merge(acc, u)
  return acc


def accumulate(f, params, batches):
  """f's statistics summed over `batches`."""
  total = None
  for batch in batches:
    s = f(params, batch)
    total = s if total is None else {p: merge(total[p], s[p]) for p in s}
  return total


def collect(apply_fn, params, batches, paths, wanted, contract_of=None):
  """{path: {stat: array}} summed over `batches` (absmean divided by count). -> (stats,
  paths in forward order)."""
  if not batches:
    raise ValueError("post-training calibration needs at least one batch.")
  contract_of = contract_of or (lambda path, ndim: layout.contract_axes(None, path, ndim))
  f, order = program(apply_fn, paths, wanted, contract_of)
  return finish(accumulate(f, params, batches)), list(order)


def finish(total):
  out = {}
  for p, s in total.items():
    s = dict(s)
    if "absmean" in s:
      s["absmean"] = s["absmean"] / s["count"]
    out[p] = s
  return out
