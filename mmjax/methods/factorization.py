"""Factorization methods selectable from a config: trained low-rank factors."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mmjax.compress import lowrank, rules
from mmjax.methods.registry import FACTORIZE, Settings, register, setting


@register("lowrank", stage=FACTORIZE, doc="Each matched kernel as two factors A @ B of "
          "rank r, initialized from its truncated SVD and trained with the model.")
@dataclasses.dataclass(frozen=True)
class LowRank(Settings):
  rank: int = setting(16, "the factors' rank r, in [1, min(K, N)] of every kernel")
  pattern: Optional[str] = setting(None, "regex over parameter paths; None: the family's "
                                   "matmul pattern")

  def check(self, where):
    if self.rank < 1:
      raise ValueError(f"{where}.rank={self.rank} must be >= 1.")

  def build(self, ctx, where):
    return on_2d_kernels(lowrank.factorize(rank=self.rank), ctx, self.pattern, where)


def on_2d_kernels(method, ctx, pattern, where):
  """`method` (a rank-r one: factors, adapters) bound to the kernels `pattern` (None: the
  family's matmul pattern) matches, its rank checked against the 2-D ones' shapes first:
  a bad rank is one line naming the section and the kernel."""
  import re
  rx = re.compile(ctx.pattern(pattern, "matmul"))
  try:
    method.check({p: ctx.shapes[p] for p in ctx.paths
                  if rx.fullmatch(p) and len(ctx.shapes[p]) == 2})
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return rules([(rx.pattern, method)], ctx.paths)
