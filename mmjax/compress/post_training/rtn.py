"""Round-to-nearest on any `formats.Grid`: the post-training baseline every method is
compared with. Scales come from the weights alone; no calibration statistics."""
from __future__ import annotations

from mmjax.compress.post_training import method as pt


def method(grid, *, contract=None, name: str | None = None):
  """`grid`: a `formats.Grid`, or {regex: Grid} per kernel."""
  of = pt.grid_map(grid)

  def solve(path, w, st):
    g = of(path)
    scale, zero = g.fit(w)
    return pt.Solved(g.round_matrix(w, scale, zero), scale=scale, zero=zero)

  return pt.build(name or f"rtn_{pt.grid_name(grid)}", solve, (), grid=grid, mode="parallel",
                  contract=contract)
