"""Sequential calibration that computes each part of the forward about once: the traced
program cut at the levels of `passes`, one compiled program per level, and the values
that later levels read kept between passes.

Block-by-block calibration (the GPTQ and SparseGPT papers) takes level L's inputs from the
forward in which the levels before it are compressed. Running the whole forward again for
every level costs levels x forward (`base`: 14 x 112 s). But a value whose kernels all
belong to levels < L is final once those are solved. So each equation of the traced
forward (nested jits inlined, each call site its own) gets a ready level, one more than
the highest level of the solved kernels it depends on, and pass L runs only what its
statistics need that no earlier pass computed for good: the values ready by L once (kept
in a per-batch cache for the passes that read them), and the values that still depend on
unsolved kernels (a block's attention after its own q/k/v, its MLP after fc1) again.
Over all passes that is about two forwards, as in the papers' code, for any model.
Equations no statistic needs (the head after the last solved kernel) never run.

These are the same primitives with the same parameters as the one-program forward of
`stats.program`, split across programs; XLA fuses them differently, so the statistics
agree to float32 rounding (tested), not always bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax.extend import core as jcore

from mmjax.compress import intercept
from mmjax.compress.intercept import _CALLS, _CASTS, _bind
from mmjax.compress.post_training import passes, stats as statistics


class _Fixed(NamedTuple):
  """A literal or a jaxpr constant: a value that is part of the program, not an input."""
  val: Any


class _Op(NamedTuple):
  eqn: Any
  ins: tuple   # value ids (int) or _Fixed
  outs: tuple  # value ids


def _flatten(closed, n_leaves: int):
  """The jaxpr as one list of equations over integer value ids, nested calls inlined (a
  call site's equations get ids of their own). -> (ids of the inputs, ops)."""
  ops, counter = [], iter(range(1 << 62))
  leaf_ids = [next(counter) for _ in range(n_leaves)]

  def walk(jaxpr, consts, in_ids):
    env = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = _Fixed(c)
    env.update(zip(jaxpr.invars, in_ids))
    read = lambda v: _Fixed(v.val) if isinstance(v, jcore.Literal) else env[v]
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if eqn.primitive.name in _CALLS and sub is not None:
        inner, c = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
        outs = walk(inner, c, ins)
      else:
        outs = [next(counter) for _ in eqn.outvars]
        ops.append(_Op(eqn, tuple(ins), tuple(outs)))
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  walk(closed.jaxpr, closed.consts, leaf_ids)
  return leaf_ids, ops


class Cut(NamedTuple):
  leaf_ids: list
  ops: list
  uses: dict    # path -> [(x id, its intercept.Dot or Conv, x and w as avals)]
  runs: list    # per level: indices of the ops it evaluates
  needs: list   # per level: ids it reads from the inputs or the cache
  keeps: list   # per level: ids it computes that later levels read
  last: dict    # id -> the last level that reads it


def cut(closed, leaf_paths: Sequence, level_of: dict, n_levels: int):
  """The per-level cut of `closed` (a jaxpr of apply_fn(params, batch); `leaf_paths` the
  path of each input leaf, None for the batch's) for kernels at `level_of` = {path: level}:
  per pass, the equations its statistics need that no earlier pass computed for good."""
  leaf_ids, ops = _flatten(closed, len(leaf_paths))
  ready, tag = {}, {}
  for i, p in zip(leaf_ids, leaf_paths):
    ready[i] = level_of[p] + 1 if p in level_of else 0
    if p in level_of:
      tag[i] = p
  op_level, uses, users = [], {}, {}
  for op in ops:
    lv = max((ready[x] for x in op.ins if not isinstance(x, _Fixed)), default=0)
    op_level.append(lv)
    tin = [None if isinstance(x, _Fixed) else tag.get(x) for x in op.ins]
    use = intercept.weight_use(op.eqn, tin)
    if use is not None:  # a dot_general or conv consuming a kernel: (x id, its Dot/Conv)
      path, wi = use
      avals = [v.aval for v in op.eqn.invars]
      uses.setdefault(path, []).append(
          (op.ins[1 - wi], intercept.record(op.eqn, path, wi, avals[1 - wi], avals[wi])))
    elif op.eqn.primitive.name in _CASTS and tin[0] is not None:
      tag[op.outs[0]] = tin[0]
    else:
      for t in tin:
        if t is not None:
          users.setdefault(t, op.eqn.primitive.name)
    for o in op.outs:
      ready[o] = lv
  unseen = sorted(set(level_of) - set(uses))
  if unseen:
    raise ValueError(intercept.unseen_message(
        "calibration", unseen, list(level_of), [p for p in leaf_paths if p is not None],
        users))
  ids = lambda xs: [x for x in xs if not isinstance(x, _Fixed)]
  stat_x = [set() for _ in range(n_levels)]
  for p, us in uses.items():
    stat_x[level_of[p]].update(ids(x for x, _ in us))
  available = set(leaf_ids)  # inputs, and final values computed by earlier passes
  runs, needs, finals = [], [], []
  for lv in range(n_levels):
    want, run = stat_x[lv] - available, []
    for k in range(len(ops) - 1, -1, -1):  # what the statistics need, backwards
      if any(o in want for o in ops[k].outs):
        run.append(k)
        want.update(x for x in ids(ops[k].ins) if x not in available)
    run.reverse()
    made = {o for k in run for o in ops[k].outs}
    read = {x for k in run for x in ids(ops[k].ins)} | stat_x[lv]
    needs.append(sorted(read - made))
    finals.append({o for o in made if ready[o] <= lv})
    available |= finals[-1]
    runs.append(run)
  last = {}
  for lv, need in enumerate(needs):
    for x in need:
      last[x] = lv
  keeps = [sorted(i for i in final if last.get(i, -1) > lv) for lv, final in enumerate(finals)]
  return Cut(leaf_ids, ops, uses, runs, needs, keeps, last)


def programs(pl: Cut, levels: Sequence[Sequence[str]], wanted, contract_of: Callable):
  """One jitted f_L(values {id: array}) -> (kept {id: array}, {path: stats}) per level."""
  out = []
  for lv, paths in enumerate(levels):
    def run(vals, row_weights, lv=lv, paths=tuple(paths)):
      env = dict(vals)
      read = lambda x: x.val if isinstance(x, _Fixed) else env[x]
      for k in pl.runs[lv]:
        op = pl.ops[k]
        env.update(zip(op.outs, _bind(op.eqn, [read(x) for x in op.ins])))
      st = {}
      for p in paths:
        per_use = []
        for k, (x, d) in enumerate(pl.uses[p]):
          d = d._replace(x=read(x))
          per_use.append(statistics.of(statistics.rows(d, contract_of(p, d.w.ndim)),
                                       wanted, statistics.use_weights(row_weights, p, k)))
        st[p] = statistics.merge_uses(per_use)
      return {i: env[i] for i in pl.keeps[lv]}, st
    out.append(jax.jit(run))
  return out


class Staged:
  """Statistics of each level in turn over the calibration batches, the forward's values
  that cross levels cached per batch. `stats(lv, leaves_of)`: leaves_of(batch) -> the
  current input leaves (the parameters with every solved kernel written in)."""

  def __init__(self, pl: Cut, levels, wanted, contract_of, batches, row_weights=None):
    self.pl, self.batches = pl, batches
    self.row_weights = row_weights or [None] * len(batches)  # per batch, or None
    self.fs, self.levels = programs(pl, levels, wanted, contract_of), levels
    self.cache = [{} for _ in batches]

  def stats(self, lv: int, leaves_of: Callable):
    pl, total = self.pl, None
    for b, batch in enumerate(self.batches):
      leaves = dict(zip(pl.leaf_ids, leaves_of(batch)))
      cache = self.cache[b]
      rw = self.row_weights[b]  # this level's paths' only: no transfers of the others'
      rw = None if rw is None else {p: rw[p] for p in self.levels[lv] if p in rw}
      kept, st = self.fs[lv]({i: leaves[i] if i in leaves else cache[i]
                              for i in pl.needs[lv]}, rw)
      for i in [i for i in cache if pl.last.get(i, -1) <= lv]:
        del cache[i]
      cache.update(kept)
      total = st if total is None else {p: statistics.merge(total[p], st[p]) for p in st}
    return total


class _Groups:
  """Batches of different shapes trace to different programs: one `Staged` per shape."""

  def __init__(self, parts):
    self.parts = parts

  def stats(self, lv: int, leaves_of: Callable):
    total = None
    for part in self.parts:
      st = part.stats(lv, leaves_of)
      total = st if total is None else {p: statistics.merge(total[p], st[p]) for p in st}
    return total


def build(apply_fn: Callable, params, flat_paths: Sequence[str], batches, paths, levels,
          wanted, contract_of: Callable, closed=None, row_weights=None):
  """`Staged` statistics for sequential calibration of `paths` in `levels`. `closed`: the
  jaxpr of apply_fn(params, batches[0]) if already traced; `row_weights`: per batch,
  {path: [row weights per use]} (`row_weights.weights`), or None: every row once."""
  statistics.check(wanted)
  level_of = {p: lv for lv, level in enumerate(levels) for p in level}
  unseen = sorted(set(paths) - set(level_of))
  if unseen:  # what consumes them, from the dataflow walk that found the others
    users = {}
    passes.dependencies(apply_fn, params, batches[0], paths, closed, users)
    raise ValueError(intercept.unseen_message("calibration", unseen, list(paths),
                                              list(flat_paths), users))
  sig = lambda b: (jax.tree.structure(b),
                   tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(b)))
  groups = {}
  for b, batch in enumerate(batches):
    groups.setdefault(sig(batch), []).append(b)
  parts = []
  for i, index in enumerate(groups.values()):
    group = [batches[b] for b in index]
    c = closed if i == 0 and closed is not None else jax.make_jaxpr(apply_fn)(params,
                                                                              group[0])
    n = len(jax.tree.leaves((params, group[0])))
    leaf_paths = list(flat_paths) + [None] * (n - len(flat_paths))
    pl = cut(c, leaf_paths, level_of, len(levels))
    statistics.check_uses({p: [d for _, d in us] for p, us in pl.uses.items()}, contract_of,
                          list(flat_paths))
    parts.append(Staged(pl, levels, wanted, contract_of, group,
                        None if row_weights is None else [row_weights[b] for b in index]))
  return parts[0] if len(parts) == 1 else _Groups(parts)
