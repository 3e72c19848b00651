"""Token reduction selectable from a config: methods that change how many tokens flow
between blocks, through module hooks (no parameter changes)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mmjax.compress import token_merge
from mmjax.methods.registry import TOKENS, Settings, register, setting


@register("tome", stage=TOKENS, doc="Token merging (ToMe): in every block of the chosen "
          "towers, the r most similar token pairs merge (size-weighted), with proportional "
          "attention.")
@dataclasses.dataclass(frozen=True)
class TokenMerging(Settings):
  r: int = setting(2, "tokens merged per block (a block merges at most half its tokens)")
  modalities: tuple = setting(("image", "audio"), "towers whose blocks merge: the blocks "
                              "<modality>/block_NN (mmjax's towers, a two-tower image tower)")
  blocks: Optional[str] = setting(None, "regex of the block module paths instead (a ViT: "
                                  r"'block_\d+')")
  keep_first: int = setting(0, "leading tokens never merged (1 for a class token)")
  proportional: bool = setting(True, "proportional attention: a merged token weighs as its "
                               "size (the attention module must take logit_bias)")

  def check(self, where):
    if self.r < 0:
      raise ValueError(f"{where}.r={self.r} must be >= 0.")
    if self.keep_first < 0:
      raise ValueError(f"{where}.keep_first={self.keep_first} must be >= 0.")
    if not self.blocks and not self.modalities:
      raise ValueError(f"{where}: give modalities (towers) or a blocks regex.")

  def build(self, ctx, where):
    towers = "|".join(self.modalities)
    if not self.blocks:
      names = {p.split("/", 1)[0] for p in ctx.paths}
      missing = [m for m in self.modalities if m not in names]
      if missing:
        raise ValueError(f"{where}.modalities={list(self.modalities)}: the model has no "
                         f"tower {missing[0]!r} (its top-level parameters: "
                         f"{sorted(names)}); name towers it has, or set {where}.blocks.")
    return token_merge.merge_tokens(
        self.r, self.blocks or rf"(?:{towers})/block_\d+", tower=None if self.blocks else
        f"(?:{towers})", attention="attn" if self.proportional else None,
        keep_first=self.keep_first, name=where.rsplit(".", 1)[-1])
