"""GPTQ (Frantar et al. 2023): round to a grid one input row at a time, spreading each
row's rounding error over the rows not yet rounded through the inverse Hessian (`obs`)."""
from __future__ import annotations

from mmjax.compress.post_training import method as pt
from mmjax.compress.post_training import obs


def check_damp(damp):
  if not 0.0 < float(damp) < 10.0:
    raise ValueError(f"Hessian damping damp={damp} must be in (0, 10) (a fraction of the "
                     "mean diagonal; 0.01 is the papers' default).")
  return float(damp)


def method(grid, *, damp: float = 0.01, block: int = 128, act_order: bool = False,
           mode: str = "sequential", contract=None, group_by: str = pt.GROUP_BY,
           name: str | None = None, balance: str = "none"):
  """`grid`: a `formats.Grid`, or {regex: Grid} per kernel (an allocator's mixed widths);
  `balance`: the Hessian's tokens weighted by sensitivity (`row_weights`: MBQ's modality
  weights, or per token)."""
  damp = check_damp(damp)
  of = pt.grid_map(grid)

  def solve(path, w, st):
    r = obs.solve(w, st["gram"], grid=of(path), damp=damp, block=block, act_order=act_order)
    return pt.Solved(r.w, scale=r.scale, zero=r.zero, ok=r.ok)

  return pt.build(name or f"gptq_{pt.grid_name(grid)}", solve, ("gram",), grid=grid, mode=mode,
                  contract=contract, group_by=group_by, damp=damp, balance=balance)
