"""The composed model: one tower per configured modality -> fusion -> head.

`MultimodalModel(cfg).apply(variables, inputs)` takes a dict keyed by modality (plus
optional `<modality>_mask` padding masks; other keys such as `label` are ignored) and
returns `(logits, intermediates)`; intermediates hold every tower's named activations,
the fusion's, and the pooled features, which is what distillation and calibration read.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.audio import AudioTower
from mmjax.models.fusion import Fusion
from mmjax.models.image import ImageTower
from mmjax.models.text import TextTower

TOWERS = {"text": TextTower, "image": ImageTower, "audio": AudioTower}


def masked_mean(x, mask):
  """Mean over real tokens: x [b, n, d], mask [b, n] -> [b, d] (zeros if none real).
  `mask` may be float token sizes (after token merging): a mean weighted by size, which
  is the mean over the input tokens the merged ones stand for."""
  w = mask.astype(x.dtype)[..., None]
  return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)


class MultimodalModel(nn.Module):
  cfg: object  # ModelConfig (validated)

  @nn.compact
  def __call__(self, inputs):
    cfg = self.cfg
    missing = [m for m in cfg.modalities if m not in inputs]
    if missing:
      raise ValueError(f"inputs lack modalities {missing}: the model is configured for "
                       f"{list(cfg.modalities)} and got keys {sorted(inputs)}.")
    tokens, masks, inter = {}, {}, {}
    # The text tower runs first: its output is ready when an image or audio block runs, so
    # a module hook there can ask it which tokens matter (token_prune's tower mode). The
    # towers are independent, so the order changes no number.
    for m in sorted(cfg.modalities, key=lambda m: cfg.towers[m].kind != "text"):
      tower_cfg = cfg.towers[m]
      if tower_cfg.kind not in TOWERS:
        raise ValueError(f"modality {m!r} has unknown tower kind {tower_cfg.kind!r}; valid "
                         f"kinds are {sorted(TOWERS)}.")
      mask = inputs.get(f"{m}_mask")
      x, tower_inter = TOWERS[tower_cfg.kind](tower_cfg, cfg, name=m)(
          jnp.asarray(inputs[m]), None if mask is None else jnp.asarray(mask))
      tokens[m], masks[m], inter[m] = x, tower_inter["mask"], tower_inter
    # a tower whose tokens were merged (token merging's hooks) reports their sizes
    sizes = ({m: inter[m].get("size", masks[m].astype(jnp.float32)) for m in masks}
             if any("size" in inter[m] for m in masks) else None)
    fused, inter["fusion"] = Fusion(cfg, name="fusion")(tokens, masks, sizes)
    # a fusion whose tokens were pruned (cross-modal pruning's hooks) reports what it kept
    masks = {**masks, **inter["fusion"].get("masks", {})}
    if sizes is not None:
      sizes = {**sizes, **inter["fusion"].get("sizes", {})}
    head = cfg.head
    if head.kind == "classify":
      weights = masks if sizes is None else sizes
      pooled = jnp.concatenate([masked_mean(fused[m], weights[m]) for m in cfg.modalities],
                               -1)
      h = nn.LayerNorm(name="head_ln")(pooled)
      inter["pooled"] = h
    else:  # per_token: logits at every position of one modality
      h = nn.LayerNorm(name="head_ln")(fused[head.token_modality])
    # A random (not zero) head: mm_arith's label correlates with no single feature at
    # initialisation, so a zero head receives only noise and passes the towers no gradient;
    # runs with a zero head stayed on the chance plateau far longer.
    logits = nn.Dense(head.num_classes, name="head")(h)
    return logits.astype(jnp.float32), inter
