"""Adapters selectable from a config: LoRA on whatever the earlier sections made of the
kernels (recovery after post-training quantization, with the base frozen by
config.optimizer.trainable='none')."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mmjax.compress import lora
from mmjax.methods.factorization import on_2d_kernels
from mmjax.methods.registry import ADAPTERS, Settings, register, setting


@register("lora", stage=ADAPTERS, doc="LoRA adapters: each matched kernel computes with its "
          "compressed view + (alpha / rank) a @ b, a and b trained with the model.")
@dataclasses.dataclass(frozen=True)
class LoRA(Settings):
  rank: int = setting(8, "the adapters' rank r, in [1, min(K, N)] of every kernel")
  alpha: Optional[float] = setting(None, "scale alpha / rank; None: alpha = rank (scale 1)")
  pattern: Optional[str] = setting(None, "regex over parameter paths; None: the family's "
                                   "matmul pattern")

  def check(self, where):
    if self.rank < 1:
      raise ValueError(f"{where}.rank={self.rank} must be >= 1.")

  def build(self, ctx, where):
    return on_2d_kernels(lora.adapters(rank=self.rank, alpha=self.alpha), ctx, self.pattern,
                         where)
