"""Token reduction selectable from a config: methods that change how many tokens flow
between blocks, through module hooks (no parameter changes)."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from mmjax.compress import token_merge, token_prune
from mmjax.methods.registry import TOKENS, Settings, register, setting


def require_modalities(ctx, modalities, where):
  """Each of `modalities` is a top-level part of the model (a tower); else one line."""
  names = {p.split("/", 1)[0] for p in ctx.paths}
  missing = [m for m in modalities if m not in names]
  if missing:
    raise ValueError(f"{where}={list(modalities)}: the model has no tower {missing[0]!r} (its "
                     f"top-level parameters: {sorted(names)}); name towers it has.")


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
    name, args = ctx.family.name, dict(ctx.family.args or {})
    pools_cls = ((name == "mmjax.pretrained.vit" and args.get("pool", "cls") == "cls")
                 or (name == "mmjax.pretrained.clip" and "image" in self.modalities
                     and not self.blocks))
    if pools_cls and self.keep_first < 1:
      raise ValueError(f"{where}.keep_first=0 would merge the class token that {name} "
                       "pools; set keep_first=1.")
    if not self.blocks:
      require_modalities(ctx, self.modalities, f"{where}.modalities")
    return token_merge.merge_tokens(
        self.r, self.blocks or rf"(?:{towers})/block_\d+", tower=None if self.blocks else
        f"(?:{towers})", attention="attn" if self.proportional else None,
        keep_first=self.keep_first, name=where.rsplit(".", 1)[-1])


@register("xprune", stage=TOKENS, doc="Cross-modal token pruning: after fusion layer k (or "
          "tower block k), each pruned modality keeps the fraction of its tokens that the "
          "query modality's cross-attention rates highest.")
@dataclasses.dataclass(frozen=True)
class CrossModalPruning(Settings):
  keep: float = setting(0.3, "fraction of each pruned modality's tokens kept, in (0, 1]")
  queries: str = setting("text", "the modality whose attention rates the others' tokens")
  modalities: tuple = setting(("image", "audio"), "the modalities whose tokens are pruned")
  layer: int = setting(0, "the fusion layer after which tokens are pruned (with block: the "
                       "layer whose cross-attention projections rank them)")
  block: Optional[int] = setting(None, "prune in the pruned towers instead, after their block "
                                 "k, ranked by the query tower's output (the later tower "
                                 "blocks run on the kept tokens too)")

  def check(self, where):
    if not 0 < self.keep <= 1:
      raise ValueError(f"{where}.keep={self.keep} must be in (0, 1] (the fraction of tokens "
                       "kept).")
    if self.layer < 0:
      raise ValueError(f"{where}.layer={self.layer} must be >= 0.")
    if self.block is not None and self.block < 0:
      raise ValueError(f"{where}.block={self.block} must be >= 0 (a tower block) or None "
                       "(prune in the fusion).")

  def build(self, ctx, where):
    require_modalities(ctx, (self.queries,), f"{where}.queries")
    require_modalities(ctx, self.modalities, f"{where}.modalities")
    layers = sorted({p.split("/")[1] for p in ctx.paths
                     if re.fullmatch(rf"fusion/layer_\d+/{self.queries}/cross_attn/query/kernel",
                                     p)})
    if f"layer_{self.layer:02d}" not in layers:
      raise ValueError(f"{where}.layer={self.layer}: the fusion has no cross-attention layer "
                       f"{self.layer} whose {self.queries!r} tokens query the others (its "
                       f"layers: {layers or 'none: fusion.kind is not cross'}).")
    if self.block is not None:
      for m in self.modalities:
        blocks = sorted({p.split("/")[1] for p in ctx.paths
                         if re.fullmatch(rf"{re.escape(m)}/block_\d+/.*", p)})
        if f"block_{self.block:02d}" not in blocks:
          raise ValueError(f"{where}.block={self.block}: tower {m!r} has no block "
                           f"{self.block} (its blocks: {blocks or 'none'}).")
      return token_prune.prune_tower_tokens(
          self.keep, self.block, queries=self.queries, prune=tuple(self.modalities),
          layer=self.layer, name=where.rsplit(".", 1)[-1])
    return token_prune.prune_tokens(self.keep, queries=self.queries,
                                    prune=tuple(self.modalities), layer=self.layer,
                                    name=where.rsplit(".", 1)[-1])
