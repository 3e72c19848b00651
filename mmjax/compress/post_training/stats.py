"""Layer statistics of the calibration batches, for any model: the inputs X [T, K] of the
products that consume each selected weight, seen through `intercept` (a convolution's X
is its input patches: `patches`).

  gram     XᵀX [K, K] summed over tokens (GPTQ, SparseGPT; AWQ scores its scales with it)
  sq       Σ x² per input channel [K] (Wanda's ‖X_k‖₂², the Gram's diagonal without the Gram)
  absmean  Σ |x| per input channel [K] (AWQ's activation magnitude), divided by `count`
  amax     max |x| per input channel [K] (SmoothQuant)
  count    rows T seen (tokens, over every use of the weight)

With row weights (`row_weights`: modality-balanced calibration) every sum weighs row t by
r_t, `count` is Σ r_t (so absmean is a weighted mean) and amax skips rows of weight 0.

X's rows are every position of every example (the product's free axes) and its columns the
contracted axes in the order of `layout.to_matrix` (the weight's contracted axes,
ascending), so `gram` pairs with the weight's matrix view row for row. For a conv kernel
([h, w, in, out] as Flax makes it) a row of X is one output position's receptive field,
ordered (h, w, in) like the kernel's [h*w*in, out] matrix view, so the conv is X @ W_mat
and GPTQ, SparseGPT, Wanda and AWQ solve it as a Dense layer. One jitted program
per set of paths computes every statistic of a batch; under a mesh the batch is sharded
and the sums are all-reduced by XLA (tested: 8 devices give the 1-device statistics).
"""
from __future__ import annotations

import itertools
import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from mmjax.compress import intercept, layout
from mmjax.compress.core import flatten

STATS = ("gram", "sq", "absmean", "amax")


def model_contract(d) -> tuple:
  """The weight's axes the product contracts, ascending (what `layout.to_matrix` needs)."""
  return tuple(sorted(d.w_contract()))


def rows(d, contract: tuple):
  """The product's activation as X [T, K], K ordered like the weight's matrix view (a
  `Conv`: its input patches)."""
  if tuple(model_contract(d)) != tuple(contract):  # `check_uses` names them all first
    raise ValueError(f"post-training: {d.path} is contracted over axes {model_contract(d)} "
                     f"by the model but the rule says {tuple(contract)}; pass "
                     f"contract={{{intercept.quoted(re.escape(d.path))}: "
                     f"{model_contract(d)}}} to the method.")
  if isinstance(d, intercept.Conv):
    return patches(d)
  (lc, rc), (lb, rb) = d.dims
  if lb or rb:
    raise ValueError(f"post-training statistics: {d.path} is consumed by a batched "
                     "dot_general (batch dims), which has no single input matrix.")
  wc, xc = d.w_contract(), d.x_contract()
  order = [xc[i] for i in sorted(range(len(wc)), key=lambda i: wc[i])]
  free = [a for a in range(d.x.ndim) if a not in xc]
  x = jnp.transpose(d.x.astype(jnp.float32), tuple(free) + tuple(order))
  k = 1
  for a in order:
    k *= d.x.shape[a]
  return x.reshape(-1, k)


def patches(c: intercept.Conv):
  """A convolution's input as X [T, K]: one row per output position (batch x output
  spatial), its receptive field in the order of the kernel's matrix view (the kernel's
  contracted axes ascending: (h, w, in) for Flax's [h, w, in, out]), so that the conv's
  output at that position is row @ `layout.to_matrix(kernel)`. Any dimension numbers,
  strides, padding (negative too), input and kernel dilation; no groups. Exact: the
  patches are slices of the padded input, no arithmetic."""
  p = c.params
  lhs, rhs, _ = c.dims
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    raise ValueError(f"post-training statistics: {c.path} is a grouped convolution "
                     f"(feature_group_count={p['feature_group_count']}, batch_group_count="
                     f"{p['batch_group_count']}), which has no single input matrix.")
  s = len(lhs) - 2
  x = jnp.transpose(c.x.astype(jnp.float32), (lhs[0], *lhs[2:], lhs[1]))  # [N, *space, C]
  x = lax.pad(x, jnp.float32(0), [(0, 0, 0)] + [
      (lo, hi, d - 1) for (lo, hi), d in zip(p["padding"], p["lhs_dilation"])] + [(0, 0, 0)])
  n, *size, cin = x.shape
  taps = [c.w.shape[a] for a in rhs[2:]]
  dil, stride = p["rhs_dilation"], p["window_strides"]
  out = [max(0, (z - (k - 1) * d - 1) // st + 1) for z, k, d, st in zip(size, taps, dil, stride)]
  k_all = math.prod(taps) * cin
  if not all(out):
    return jnp.zeros((0, k_all), jnp.float32)
  cols = []
  for offs in itertools.product(*map(range, taps)):  # kernel position, row-major
    start = (0, *(o * d for o, d in zip(offs, dil)), 0)
    limit = (n, *(b + (m - 1) * st + 1 for b, m, st in zip(start[1:-1], out, stride)), cin)
    cols.append(lax.slice(x, start, limit, (1, *stride, 1)))
  t = jnp.stack(cols, axis=-2).reshape(n, *out, *taps, cin)
  kernel_axes = (*rhs[2:], rhs[1])  # the kernel axis of each of t's last s + 1 axes
  order = sorted(range(s + 1), key=lambda i: kernel_axes[i])
  t = jnp.transpose(t, (*range(1 + s), *(1 + s + i for i in order)))
  return t.reshape(-1, k_all)


def unsupported(d):
  """Why a use has no single input matrix, or None."""
  if isinstance(d, intercept.Conv):
    groups = [f"{k}={d.params[k]}" for k in ("feature_group_count", "batch_group_count")
              if d.params[k] != 1]
    return f"a grouped convolution ({', '.join(groups)})" if groups else None
  (_, _), (lb, rb) = d.dims
  return "a batched dot_general (batch dims)" if lb or rb else None


def contract_hint(needs: dict, shapes: dict) -> str:
  """`needs` {path: axes the model contracts} over every path of a method -> the `contract=`
  argument that gives each its axes: `layout.FLAX_ATTENTION` if it does, else a dict whose
  patterns (checked against the method's paths) name the kernels that need other axes
  than the default (every axis but the last)."""
  if all(layout.contract_axes(layout.FLAX_ATTENTION, p, len(shapes[p])) == a
         for p, a in needs.items()):
    return "contract=layout.FLAX_ATTENTION"
  default = lambda p: layout.contract_axes(None, p, len(shapes[p]))
  groups = {}
  for p, a in sorted(needs.items()):
    if a != default(p):
      groups.setdefault(a, []).append(p)
  entries = []
  for a, ps in sorted(groups.items()):
    rx = intercept.rule_for(ps, sorted(set(needs) - set(ps)), list(needs))
    entries.append(f"{intercept.quoted(rx)}: {a}")
  return "contract={" + ", ".join(entries) + "}"


def check_uses(uses: dict, contract_of, universe, what: str = "post-training"):
  """Every use {path: [Dot or Conv]} has one input matrix and is contracted as the rule
  says; else one error naming every offending path, with a rule that leaves out the
  unsupported ones (checked against `universe`, the model's paths) and the `contract=`
  that fits the others."""
  bad, wrong, needs, shapes = {}, [], {}, {}
  for path, ds in uses.items():
    for d in ds:
      kind = unsupported(d)
      if kind:
        bad.setdefault(path, kind)
        continue
      shapes[path], needs[path] = tuple(d.w.shape), model_contract(d)
      if needs[path] != tuple(contract_of(path, d.w.ndim)):
        wrong.append(path)
  problems = []
  if bad:
    first = sorted(bad)[0]
    rx = intercept.rule_for(sorted(set(uses) - set(bad)), sorted(bad), universe)
    fix = (f"a rule that leaves them out: {intercept.quoted(rx)}" if rx is not None else
           "no parameter of the rule has one, so drop the rule")
    problems.append(f"{intercept.more(sorted(bad))} is consumed by {bad[first]}, which has "
                    f"no single input matrix; {fix}")
  if wrong:
    wrong = sorted(set(wrong))
    p = wrong[0]
    problems.append(f"{intercept.more(wrong)} is contracted over axes {needs[p]} by the model "
                    f"but the rule says {tuple(contract_of(p, len(shapes[p])))}; pass "
                    f"{contract_hint(needs, shapes)} to the method")
  if problems:
    raise ValueError(f"{what}: " + "; also ".join(problems) + ".")


def of(x, wanted, r=None):
  """The statistics of rows X [T, K]; `r` [T]: each row's weight (`row_weights`: sums
  become Σ r_t ·, count Σ r_t, amax over the rows of weight > 0)."""
  if r is None:
    out = {"count": jnp.float32(x.shape[0])}
    xr = x
  else:
    r = r.astype(jnp.float32)
    out = {"count": jnp.sum(r)}
    xr = x * r[:, None]
  if "gram" in wanted:
    out["gram"] = jnp.einsum("tk,tl->kl", xr, x, precision=jax.lax.Precision.HIGHEST)
  if "sq" in wanted:
    out["sq"] = jnp.sum(xr * x, axis=0)
  if "absmean" in wanted:
    out["absmean"] = jnp.sum(jnp.abs(xr), axis=0)
  if "amax" in wanted:
    ax = jnp.abs(x) if r is None else jnp.where(r[:, None] > 0, jnp.abs(x), 0.0)
    out["amax"] = jnp.max(ax, axis=0)
  return out


def use_weights(row_weights, path: str, k: int):
  """Use k of `path`'s row weights, or None (`row_weights`: {path: [per use]} or None)."""
  if row_weights is None or path not in row_weights:
    return None
  return row_weights[path][k]


def merge(a, b):
  return {k: (jnp.maximum(a[k], b[k]) if k == "amax" else a[k] + b[k]) for k in a}


def program(apply_fn: Callable, paths: Sequence[str], wanted: Sequence[str],
            contract_of: Callable[[str, int], tuple], convs: bool = True,
            what: str = "calibration"):
  """-> (jitted f(params, batch, row_weights=None) -> {path: stats}, order): every path's
  statistics from one forward (each row weighted, given `row_weights` {path: [per use]});
  `order` lists the paths in the order the forward consumes them (filled when f is first
  traced). Sequential calibration cuts the forward instead (`staged`).
  `convs=False`: a conv kernel among `paths` is an error (a method that rewrites the
  products, as SmoothQuant does, cannot use a conv's statistics)."""
  check(wanted)
  order = []

  def f(params, batch, row_weights=None):
    counts = {}

    def stat(d):  # a use that cannot be measured is named below, with every other one
      axes = contract_of(d.path, d.w.ndim)
      k = counts[d.path] = counts.get(d.path, -1) + 1
      ok = not unsupported(d) and model_contract(d) == tuple(axes)
      return d, (of(rows(d, axes), wanted, use_weights(row_weights, d.path, k))
                 if ok else None)

    seen = intercept.observe(apply_fn, list(paths), stat, convs, what)(params, batch)
    check_uses({p: [d for d, _ in uses] for p, uses in seen.items()}, contract_of,
               list(flatten(params)))
    order[:] = list(seen)
    return {path: merge_uses([st for _, st in uses]) for path, uses in seen.items()}

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


def accumulate(f, params, batches, row_weights=None):
  """f's statistics summed over `batches` (`row_weights`: per batch, as `row_weights`
  gives them)."""
  total = None
  for b, batch in enumerate(batches):
    s = f(params, batch, None if row_weights is None else row_weights[b])
    total = s if total is None else {p: merge(total[p], s[p]) for p in s}
  return total


def collect(apply_fn, params, batches, paths, wanted, contract_of=None, convs: bool = True,
            what: str = "calibration"):
  """{path: {stat: array}} summed over `batches` (absmean divided by count). -> (stats,
  paths in forward order)."""
  if not batches:
    raise ValueError("post-training calibration needs at least one batch.")
  contract_of = contract_of or (lambda path, ndim: layout.contract_axes(None, path, ndim))
  f, order = program(apply_fn, paths, wanted, contract_of, convs, what)
  return finish(accumulate(f, params, batches)), list(order)


def finish(total):
  out = {}
  for p, s in total.items():
    s = dict(s)
    if "absmean" in s:
      s["absmean"] = s["absmean"] / s["count"]
    out[p] = s
  return out
