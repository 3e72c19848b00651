"""One `Method` shape for every post-training method: calibrate once, then an ordinary
parameter tree plus masks and grid metadata, which fine-tunes and exports like any other.

A method here is a `solve(path, w [K, N], stats) -> Solved` on each selected kernel's
matrix view (`layout.to_matrix`) and the statistics it asks for (`stats.STATS`); a
convolution's kernel is solved the same way, from the statistics of its input patches
(`stats.patches`: the conv is the Dense layer over them). This module turns it into a
`Method`:

  calibrate   statistics of the batches, the kernels solved, the new weights written into
              the parameters (what a later fine-tuning step starts from)
  view        with a grid: the weights rounded to it with the fixed scales the solver chose
              (straight-through gradients); idempotent on the solved weights
  update      with masks: the weights masked at step 0 and after every optimizer step, as
              in `pruning` (fine-tuning keeps the sparsity)
  describe    mask / N:M for the report, the grid's format, bits and bytes

Calibration modes, as in the GPTQ and SparseGPT papers:
  sequential  kernels are solved block by block in the order the forward consumes them;
              each block's statistics come from the forward with every earlier block
              already compressed; blocks whose inputs do not depend on each other (the
              towers of a multimodal model) share a pass (`passes.levels`), and each
              pass runs only the part of the forward not computed for good by an earlier
              one (`staged`: about two forwards in all instead of one per level)
  parallel    every statistic from the dense forward, one pass (faster; errors of earlier
              layers are not seen by later ones)
A block is what `group_by` (a regex, its first group the block's name) gives
(`passes.blocks`): by default the prefix up to `block_NN` / `layer_NN` / `layers_N`.

Stacked layers (a scan over layers; the layout says `layout.stacked`): the calibration
forward is the scan unrolled (`unroll`), each layer's slice a kernel of its own and each
scan iteration a block, so layer l is solved from the forward through the compressed
layers < l, exactly as the unrolled twin would be (tested); the layers' results are put
back side by side (`side_by_side`: grid scales [G, depth * N], masks the kernel's shape,
AWQ's input scales [depth, K]). Cost: the unrolled forward's compile time grows with depth;
the passes are those of the twin.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mmjax.compress import intercept, layout, storage, unroll
from mmjax.compress.core import Method, flatten, unflatten
from mmjax.compress.formats import Grid
from mmjax.compress.post_training import passes, row_weights, staged, stats as statistics
from mmjax.compress.post_training.passes import GROUP_BY, blocks  # noqa: F401 (API)
from mmjax.compress.pruning import apply_masks

MODES = ("sequential", "parallel")


class Solved(NamedTuple):
  w: jax.Array                    # [K, N] the new weights (what the layer computes with)
  mask: Optional[jax.Array] = None  # [K, N] bool kept
  scale: Optional[jax.Array] = None  # [G, N] grid scales (of diag(in_scale) W)
  zero: Optional[jax.Array] = None
  in_scale: Optional[jax.Array] = None  # [K] AWQ's per-input scales (ones otherwise)
  ok: Optional[jax.Array] = None  # False: the damped Hessian was not positive definite


def calibrate_kernels(calib, flat, solve: Callable, wanted, mode: str, contract=None,
                      group_by: str = GROUP_BY, log=None, balance: str = "none"):
  """-> {path: (w [K, N] solved, Solved)} for `calib.paths`, in sequential or parallel
  mode. `flat` holds the method's master weights (solved from), `calib.params` the view
  the forward computes with. Stacked layers (`layout.stacked`, a scan in the forward) are
  solved layer by layer from each layer's own statistics (`unroll`); their `Solved` is the
  layers' side by side along the columns of the stacked kernel's matrix view. `balance`:
  each token's rows weighted by its sensitivity (`row_weights`), or "none"."""
  contract_of = lambda path, ndim: layout.contract_axes(contract, path, ndim)
  paths = list(calib.paths)
  if not calib.batches:
    raise ValueError("post-training calibration needs at least one batch.")
  if not wanted:  # round-to-nearest: the weights alone, no forward
    return {p: _per_layer(p, flat[p], layout.depth_axes(contract, p, flat[p].ndim),
                          contract_of, solve) for p in paths}
  closed = jax.make_jaxpr(calib.apply_fn)(calib.params, calib.batches[0])
  u = unroll.unroll(calib.apply_fn, calib.params, calib.batches[0], paths, closed=closed)
  if u is None:
    return _calibrate(calib, flat, solve, wanted, mode, contract_of, group_by, closed=closed,
                      balance=balance)
  of = {v: (p, i) for p, vs in u.layers.items() for i, v in enumerate(vs)}
  check_stacked(u.layers, {p: flat[p].shape for p in paths}, contract)
  vcontract = layer_contract(contract, u)
  vflat = {v: (flat[of[v][0]][of[v][1]] if v in of else flat[v]) for v in u.paths}
  row_groups = calib.row_groups and (  # the model's layout, named by the unrolled paths
      lambda fn, p, b: _renamed(calib.row_groups(calib.apply_fn, calib.params, b), of))
  done = _calibrate(calib._replace(apply_fn=u.apply_fn, params=u.params, paths=tuple(u.paths),
                                   row_groups=row_groups),
                    vflat, solve, wanted, mode, vcontract, group_by, u.block_of,
                    balance=balance)
  out = {p: done[p] for p in paths if p not in u.layers}
  out.update({p: side_by_side([done[v] for v in vs]) for p, vs in u.layers.items()})
  return out


def _renamed(layout, of):
  """A row layout f(path, shape) for the paths of an unrolled forward (`of`: layer path ->
  (stacked path, index))."""
  return lambda v, shape: layout(of.get(v, (v,))[0], shape)


def layer_contract(contract, u):
  """f(path, ndim) -> contracted axes for the paths of `u` (an `unroll.Unrolled`): a
  layer `p[i]` of a stacked leaf gets the stacked spec's axes within one layer."""
  of = {v: p for p, vs in u.layers.items() for v in vs}

  def f(v, ndim):
    if v not in of:
      return layout.contract_axes(contract, v, ndim)
    return tuple(a - 1 for a in layout.contract_axes(contract, of[v], ndim + 1))
  return f


def _spec_text(contract) -> str:
  if contract is None:
    return "None"
  if contract == layout.FLAX_ATTENTION:
    return "layout.FLAX_ATTENTION"
  return repr(contract)


def check_stacked(layers: dict, shapes: dict, contract, what: str = "post-training"):
  """The stacked leaves a scan slices (`unroll`: {path: its layers}) are declared stacked
  by one axis in the layout spec; else one error naming them and the spec that does."""
  bad = sorted(p for p in layers if layout.depth_axes(contract, p, len(shapes[p])) != 1)
  if not bad:
    return
  p, d = bad[0], layout.depth_axes(contract, bad[0], len(shapes[bad[0]]))
  rx = min(intercept.rule_for(sorted(layers), sorted(set(shapes) - set(layers)), list(shapes)),
           "|".join(re.escape(q) for q in sorted(layers)), key=len)
  spec = _spec_text(contract)
  rest = ("" if contract is None else
          f", **{spec}" if isinstance(contract, dict) else f", r'.*': {spec}")
  has = (f"treats it as one kernel (contraction axes "
         f"{layout.contract_axes(contract, p, len(shapes[p]))})" if not d
         else f"gives it {d} stack axes")
  raise ValueError(f"{what}: {intercept.more(bad)} of shape {tuple(shapes[p])} is stacked (a "
                   f"scan slices its axis 0 into {len(layers[p])} layers) but the layout spec "
                   f"{has}; pass contract={{{intercept.quoted(rx)}: layout.stacked({spec})"
                   f"{rest}}} (axes counted within one layer's kernel) so each layer is solved "
                   "from its own statistics.")


def side_by_side(layers: list) -> Solved:
  """The `Solved` of each layer of a stacked kernel -> the stacked kernel's: weights, masks
  and grid scales side by side along the matrix view's columns (layer l's outputs are
  columns l * N ...), AWQ's input scales stacked [depth, K]."""
  cat = lambda xs: None if xs[0] is None else jnp.concatenate(xs, axis=1)
  return Solved(cat([r.w for r in layers]), cat([r.mask for r in layers]),
                cat([r.scale for r in layers]), cat([r.zero for r in layers]),
                None if layers[0].in_scale is None else jnp.stack([r.in_scale for r in layers]),
                None if layers[0].ok is None else jnp.all(jnp.stack([r.ok for r in layers])))


def _per_layer(path, w, depth: int, contract_of, solve, st=None):
  """Solve one kernel, or each layer of a stacked one (statistics-free solvers)."""
  axes = contract_of(path, w.ndim)
  if not depth:
    return solve(path, layout.to_matrix(w, axes), st or {})
  sub = tuple(a - depth for a in axes)
  per = w.reshape((-1,) + w.shape[depth:])
  return side_by_side([solve(path, layout.to_matrix(x, sub), st or {}) for x in per])


def _calibrate(calib, flat, solve, wanted, mode, contract_of, group_by, block_of=None,
               closed=None, balance="none"):
  paths = list(calib.paths)
  params = flatten(calib.params)
  done = {}
  rw = None
  if balance != "none":  # from the forward the method starts from, as MBQ
    rw = row_weights.weights(calib.apply_fn, calib.params, calib.batches, paths, balance,
                             calib.loss, calib.row_groups)

  def solve_block(block_paths, st):
    for p in block_paths:
      w = flat[p]
      axes = contract_of(p, w.ndim)
      res = solve(p, layout.to_matrix(w, axes), st[p])
      done[p] = res
      params[p] = layout.from_matrix(res.w, w.shape, axes).astype(w.dtype)

  if mode == "parallel":
    f, _ = statistics.program(calib.apply_fn, paths, wanted, contract_of)
    solve_block(paths, statistics.finish(statistics.accumulate(f, calib.params,
                                                               calib.batches, rw)))
  else:
    # independent blocks (the towers) share a pass; each pass runs only the part of the
    # forward its statistics need that earlier passes have not computed for good (`staged`)
    tree = calib.params
    closed = closed or jax.make_jaxpr(calib.apply_fn)(tree, calib.batches[0])
    _, levels = passes.solve_order(calib.apply_fn, tree, calib.batches[0], paths,
                                     group_by, closed, block_of)
    cut = staged.build(calib.apply_fn, tree, list(params), calib.batches, paths, levels,
                       wanted, contract_of, closed, rw)
    leaves_of = lambda batch: jax.tree.leaves((unflatten(params, calib.params), batch))
    for lv, level in enumerate(levels):
      solve_block(level, statistics.finish(cut.stats(lv, leaves_of)))
  return done


def in_columns(in_scale, n_cols: int):
  """Input scales [K] -> [K, 1]; a stacked kernel's [*stack, K] -> [K, n_cols], each
  layer's scales on its own columns (`side_by_side`)."""
  if in_scale.ndim == 1:
    return in_scale[:, None]
  per = in_scale.reshape(-1, in_scale.shape[-1])
  return jnp.repeat(per.T, n_cols // per.shape[0], axis=1)


def grid_map(grid):
  """A Grid, or {regex: Grid} (first full match; per-layer settings, e.g. an allocator's)
  -> f(path) -> Grid or None."""
  if grid is None or isinstance(grid, Grid):
    return lambda path: grid
  pairs = [(re.compile(k), g) for k, g in grid.items()]

  def of(path):
    for rx, g in pairs:
      if rx.fullmatch(path):
        return g
    raise ValueError(f"no grid given for {path}; the per-path grids' patterns are "
                     f"{[k for k in grid]}.")
  return of


def grid_name(grid) -> str:
  return grid.name if isinstance(grid, Grid) else "mixed"


def build(name: str, solve: Callable, wanted: tuple, *, grid=None,
          masks: bool = False, n_m: Optional[tuple] = None, mode: str = "sequential",
          contract=None, group_by: str = GROUP_BY, damp: float | None = None,
          in_scales: bool = False, balance: str = "none") -> Method:
  """A post-training `Method` from a per-kernel solver (see the module docstring);
  `balance`: its statistics' rows weighted by sensitivity (`row_weights`)."""
  row_weights.check_balance(balance, f"{name}: balance")
  if balance != "none" and not wanted:
    raise ValueError(f"{name}: balance={balance!r} weighs calibration tokens, and this "
                     "method reads no calibration statistics; drop balance.")
  if mode not in MODES:
    raise ValueError(f"post-training mode={mode!r} is unknown; valid: {', '.join(MODES)}.")
  try:
    re.compile(group_by)
  except re.error as e:
    raise ValueError(f"post-training group_by={group_by!r} is not a regex: {e}.") from None

  grid_of = grid_map(grid)

  def axes(path, w):
    return layout.contract_axes(contract, path, w.ndim)

  def ones_in(path, w, k):  # input scales: [K], or [*stack, K] per layer of a stacked kernel
    return jnp.ones(tuple(w.shape[:layout.depth_axes(contract, path, w.ndim)]) + (k,),
                    jnp.float32)

  def leave_out(bad, shapes):  # a rule for the method's own leaves without `bad`
    rx = intercept.rule_for(sorted(set(shapes) - set(bad)), sorted(bad), list(shapes))
    return (f"a rule that leaves them out: {intercept.quoted(rx)}" if rx is not None else
            "no leaf of the rule qualifies")

  def check(shapes):
    layout.check(contract, shapes, name)
    flat = sorted(p for p, shape in shapes.items() if len(shape) < 2)
    if flat:
      raise ValueError(f"{intercept.more(flat)} has shape {tuple(shapes[flat[0]])}: "
                       "post-training methods work on matmul and conv kernels; "
                       f"{leave_out(flat, shapes)}.")
    odd = []
    for path, shape in shapes.items():
      k = 1
      for a in layout.contract_axes(contract, path, len(shape)):
        k *= shape[a]
      if grid is not None:
        grid_of(path).check(k, f"{path}: ")
        if grid_of(path).granularity == "tensor" and layout.depth_axes(contract, path,
                                                                       len(shape)):
          raise ValueError(f"{path} is stacked (layout.stacked): a per-tensor grid would share "
                           "one scale across its layers; use granularity='channel' or 'group'.")
      if n_m and k % n_m[1]:
        odd.append((path, k))
    if odd:
      (path, k) = min(odd)
      raise ValueError(f"{intercept.more(sorted(p for p, _ in odd))}: the contraction size "
                       f"{k} is not divisible by M={n_m[1]} of N:M; choose another M, or "
                       f"{leave_out([p for p, _ in odd], shapes)}.")

  def init(flat, rng):
    state = {}
    for p, w in flat.items():
      s = {}
      if grid is not None:
        m = layout.to_matrix(w, axes(p, w))
        s["scale"], s["zero"] = grid_of(p).fit(m)
        s["in_scale"] = ones_in(p, w, m.shape[0])
      if masks:
        s["mask"] = jnp.ones(w.shape, bool)
      state[p] = s
    return state

  def view(flat, state):
    out = {}
    for p, w in flat.items():
      st, ax = state[p], axes(p, w)
      m = layout.to_matrix(w, ax)
      k = m.shape[0]
      inv = in_columns(st["in_scale"], m.shape[1]).astype(m.dtype)
      g = grid_of(p)
      q = g.fake(m * inv, g.expand(st["scale"], k), g.expand(st["zero"], k)) / inv
      out[p] = layout.from_matrix(q, w.shape, ax).astype(w.dtype)
    return out

  def update(flat, state, step):
    return apply_masks(flat, {p: s["mask"] for p, s in state.items()}), state

  def calibrate(flat, state, calib):
    solved = calibrate_kernels(calib, flat, solve, wanted, mode, contract, group_by,
                               balance=balance)
    new_flat, new_state = {}, {}
    for p, w in flat.items():
      res, ax = solved[p], axes(p, w)
      if res.ok is not None and not bool(res.ok):
        raise ValueError(f"{name}: the Hessian of {p} is not positive definite even with "
                         f"damping {damp}; raise the damping (e.g. damp={10 * (damp or 0.01):g})"
                         " or give more calibration examples.")
      s = dict(state[p])
      if grid is not None:
        s["scale"], s["zero"] = res.scale, res.zero
        s["in_scale"] = (res.in_scale.reshape(ones_in(p, w, res.w.shape[0]).shape)
                         if res.in_scale is not None
                         else ones_in(p, w, res.w.shape[0])).astype(jnp.float32)
      if masks:
        s["mask"] = layout.from_matrix(res.mask, w.shape, ax)
      new_state[p] = s
      new_flat[p] = layout.from_matrix(res.w, w.shape, ax).astype(w.dtype)
    return new_flat, new_state

  def describe(flat, state):
    out = {}
    for p, w in flat.items():
      records = []
      if masks:
        records.append(storage.Mask(state[p]["mask"], n_m=tuple(n_m) if n_m else None))
      if grid is not None:
        records.append(storage.GridCodes(
            state[p]["scale"], state[p]["zero"],
            state[p]["in_scale"] if in_scales else None, grid=grid_of(p),
            contract=tuple(axes(p, w))))
      out[p] = tuple(records)
    return out

  return Method(name, init=init, view=view if grid is not None else None,
                update=update if masks else None, calibrate=calibrate, describe=describe,
                check=check)
