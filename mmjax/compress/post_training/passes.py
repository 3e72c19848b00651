"""Which blocks sequential calibration may solve from one forward: those whose inputs do not
depend on each other's kernels.

Sequential calibration (the GPTQ and SparseGPT papers) takes a block's statistics from the
forward in which every earlier block is already compressed. Only the earlier blocks that
the block's inputs depend on can change those statistics, and in a multimodal model the
towers are independent until the fusion: text block 3 and image block 3 can be measured in
one pass. `levels` groups the blocks so: a block's level is one more than the highest level
among the blocks its inputs depend on. Solving level by level gives exactly the weights of
block by block (tested) in fewer passes: `base` (3 towers x 12 blocks, 2 fusion layers)
needs 14 passes instead of 38; `staged` then runs in each pass only the part of the forward
that pass needs (1.5 forwards in all on `base`, bench/README.md).

The dependence is read off the traced program, for any model: a dataflow pass over the
jaxpr of `apply_fn(params, batch)`, following nested jits as the interceptor does (a
kernel's products are its `dot_general`s and `conv_general_dilated`s). What it
cannot look into (scan, while, cond, custom derivatives) is taken conservatively: each
output depends on every input; a scan over stacked layers is unrolled before it runs
(`unroll`), its layers grouped by iteration (`blocks(block_of=...)`). If a block's inputs depend on a block the forward first
uses later (a weight used twice), the blocks are kept one per level, in order.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
from jax.extend import core as jcore

from mmjax.compress.core import flatten
from mmjax.compress.intercept import _CALLS, _CASTS, weight_use

_NONE = frozenset()
GROUP_BY = r"(.*?(?:[Bb]lock|[Ll]ayers?)_?\d+)/.*"


def blocks(order, group_by: str = GROUP_BY, block_of: dict | None = None):
  """Paths in forward order -> [[paths of block 1], [block 2], ...] in first-use order; a
  block is what `group_by` (a regex, its first group the block's name) gives: by default
  the prefix up to `block_NN` / `layer_NN` / `layers_N`; other paths are blocks of their own.
  `block_of` {path: block name} overrides it (a stacked layer's kernels: one scan iteration,
  `unroll`)."""
  rx = re.compile(group_by)
  block_of = block_of or {}
  out, index = [], {}
  for p in order:
    m = rx.fullmatch(p)
    key = ("block_of", block_of[p]) if p in block_of else (m.group(1) if m else p)
    if key not in index:
      index[key] = len(out)
      out.append([])
    out[index[key]].append(p)
  return out


def _walk(jaxpr, deps_in, tags_in, found, users):
  """Deps of jaxpr's outputs; `found[path]` |= deps of every input x of path's products
  (dot_general, or conv_general_dilated with path the kernel); `users[path]`: the first
  other primitive that reads a kernel (for the error when it is not a product's)."""
  dep, tag = {}, {}
  for v, d, t in zip(jaxpr.invars, deps_in, tags_in):
    dep[v] = d
    if t is not None:
      tag[v] = t
  lit = lambda v: isinstance(v, jcore.Literal)
  for eqn in jaxpr.eqns:
    ds = [_NONE if lit(v) else dep.get(v, _NONE) for v in eqn.invars]
    ts = [None if lit(v) else tag.get(v) for v in eqn.invars]
    name = eqn.primitive.name
    out_tags = [None] * len(eqn.outvars)
    use = weight_use(eqn, ts) if any(t is not None for t in ts) else None
    if use is not None:
      path, wi = use
      found[path] = found.get(path, _NONE) | ds[1 - wi]
      outs = [ds[0] | ds[1]]
    elif name in _CASTS:
      outs, out_tags = [ds[0]], [ts[0]]
    elif name in _CALLS and ("jaxpr" in eqn.params or "call_jaxpr" in eqn.params):
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      outs = _walk(getattr(sub, "jaxpr", sub), ds, ts, found, users)
    else:
      for t in ts:
        if t is not None:
          users.setdefault(t, name)
      u = _NONE.union(*ds)
      outs = [u] * len(eqn.outvars)
    for v, d, t in zip(eqn.outvars, outs, out_tags):
      dep[v] = d
      if t is not None:
        tag[v] = t
  return [_NONE if lit(v) else dep.get(v, _NONE) for v in jaxpr.outvars]


def dependencies(apply_fn: Callable, params, batch, paths: Sequence[str],
                 closed=None, users: dict | None = None) -> dict:
  """{path: the kernels among `paths` that the inputs of path's products depend on}, in the
  order the forward first uses each path (one trace of `apply_fn(params, batch)`, or
  `closed`, its jaxpr, if already traced). `users`, if given, is filled with {path: the
  first other primitive reading it} for the kernels no product consumes."""
  wanted = set(paths)
  closed = closed or jax.make_jaxpr(apply_fn)(params, batch)
  flat = flatten(params)
  n = len(jax.tree.leaves((params, batch)))
  tags = [p if p in wanted else None for p in flat]
  deps = [frozenset([p]) if p in wanted else _NONE for p in flat]
  found = {}
  _walk(closed.jaxpr, deps + [_NONE] * (n - len(deps)), tags + [None] * (n - len(tags)),
        found, {} if users is None else users)
  return found


def levels(groups: Sequence[Sequence[str]], deps: dict) -> list:
  """Blocks (lists of paths, in first-use order) and `dependencies` -> levels (lists of
  paths): each block one level above the highest of the blocks its inputs depend on."""
  block_of = {p: i for i, block in enumerate(groups) for p in block}
  level_of, out = {}, []
  for i, block in enumerate(groups):
    needs = {block_of[q] for p in block for q in deps.get(p, _NONE) if q in block_of} - {i}
    if any(j not in level_of for j in needs):  # depends on a later-used block: keep order
      return [list(b) for b in groups]
    lv = 1 + max((level_of[j] for j in needs), default=-1)
    level_of[i] = lv
    if lv == len(out):
      out.append([])
    out[lv].extend(block)
  return out


def solve_order(apply_fn: Callable, params, batch, paths: Sequence[str],
                group_by: str = GROUP_BY, closed=None, block_of: dict | None = None) -> tuple:
  """-> (blocks, levels) of `paths` for sequential calibration, from one trace."""
  deps = dependencies(apply_fn, params, batch, paths, closed)
  groups = blocks(list(deps), group_by, block_of)
  return groups, levels(groups, deps)
