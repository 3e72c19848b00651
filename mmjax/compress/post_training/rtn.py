"""Round-to-nearest on any `formats.Grid`: the post-training baseline every method is
compared with. Scales come from the weights alone; no calibration statistics."""
from __future__ import annotations

from mmjax.compress.formats import Grid
from mmjax.compress.post_training import method as pt


def method(grid: Grid, *, contract=None, name: str | None = None):
  def solve(path, w, st):
    scale, zero = grid.fit(w)
    return pt.Solved(grid.round_matrix(w, scale, zero), scale=scale, zero=zero)

  return pt.build(name or f"rtn_{grid.name}", solve, (), grid=grid, mode="parallel",
                  contract=contract)
