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
    method = lowrank.factorize(rank=self.rank)
    try:
      method.check({p: ctx.shapes[p] for p in kernels_2d(ctx, self.pattern)})
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    return rules([(ctx.pattern(self.pattern, "matmul"), method)], ctx.paths)


def kernels_2d(ctx, pattern):
  """The 2-D parameters `pattern` (None: the family's matmul pattern) fully matches."""
  import re
  rx = re.compile(ctx.pattern(pattern, "matmul"))
  return {p for p in ctx.paths if rx.fullmatch(p) and len(ctx.shapes[p]) == 2}
