"""SparseGPT (Frantar & Alistarh 2023): prune by OBS saliency a block at a time and
compensate the pruned weights' error in the rows not yet fixed (`obs`); unstructured or
N:M, optionally quantizing what is kept in the same pass (joint sparsity + quantization)."""
from __future__ import annotations

from mmjax.compress.post_training import method as pt
from mmjax.compress.post_training import obs
from mmjax.compress.post_training.gptq import check_damp
from mmjax.compress.pruning import check_sparsity


def method(sparsity: float = 0.5, *, n_m: tuple | None = None, grid=None,
           damp: float = 0.01, block: int = 128, mode: str = "sequential", contract=None,
           group_by: str = pt.GROUP_BY, name: str | None = None):
  damp = check_damp(damp)
  of = pt.grid_map(grid)
  if n_m is not None:
    n, m = n_m
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
      raise ValueError(f"N:M pruning needs integers 1 <= N < M, got N={n}, M={m}.")
    sparsity, n_m = 0.0, (n, m)
  else:
    sparsity = check_sparsity(sparsity)

  def solve(path, w, st):
    r = obs.solve(w, st["gram"], grid=of(path), sparsity=sparsity, n_m=n_m, damp=damp,
                  block=block)
    return pt.Solved(r.w, mask=r.mask, scale=r.scale if grid else None,
                     zero=r.zero if grid else None, ok=r.ok)

  what = f"{n_m[0]}of{n_m[1]}" if n_m else f"{sparsity:g}"
  return pt.build(name or f"sparsegpt_{what}" + (f"_{pt.grid_name(grid)}" if grid else ""), solve,
                  ("gram",), grid=grid, masks=True, n_m=n_m, mode=mode, contract=contract,
                  group_by=group_by, damp=damp)
