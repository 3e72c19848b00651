"""Fusion of per-modality token sequences, chosen by `FusionConfig.kind`.

  * cross: in each layer every modality attends (queries) to the concatenated tokens of
    all the others (keys/values): `fusion/layer_00/<modality>/cross_attn/...`. With a
    single modality it attends to itself.
  * joint: tokens of all modalities (plus a learned per-modality type embedding) are
    concatenated and self-attend: `fusion/block_00/...`.
  * bottleneck: as in multimodal bottleneck transformers, a few shared tokens are the only
    path between modalities: each modality self-attends over [its tokens; bottleneck],
    and the bottleneck updates are averaged: `fusion/layer_00/<modality>/...`.

Modalities are dict keys, iterated in sorted order; nothing here names a modality.
`sizes` (optional, {modality: [b, n_m]}): how many input tokens each token stands for,
after token merging; attention then weighs a token of size s as s copies (ToMe's
proportional attention, a log(s) logit bias). Without it every token counts once.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.kernels.attention import size_bias
from mmjax.models.layers import CrossBlock, EncoderBlock, compute_dtype


def _block_kwargs(cfg):
  return dict(num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
              implementation=cfg.attention_impl, gelu_approximate=cfg.gelu_approximate,
              mlp_gated=cfg.mlp_gated, head_dim=cfg.head_dim,
              dtype=compute_dtype(cfg))


class CrossLayer(nn.Module):
  cfg: object

  @nn.compact
  def __call__(self, tokens, masks, biases=None):
    names = sorted(tokens)
    out = {}
    for m in names:
      others = [o for o in names if o != m] or [m]
      ctx = jnp.concatenate([tokens[o] for o in others], axis=1)
      ctx_mask = jnp.concatenate([masks[o] for o in others], axis=1)
      ctx_bias = None if biases is None else jnp.concatenate([biases[o] for o in others], 1)
      out[m] = CrossBlock(**_block_kwargs(self.cfg), name=m)(tokens[m], ctx, ctx_mask,
                                                             ctx_bias)
    return out


class BottleneckLayer(nn.Module):
  cfg: object

  @nn.compact
  def __call__(self, tokens, masks, z, biases=None):
    out, zs = {}, []
    for m in sorted(tokens):
      n = tokens[m].shape[1]
      x = jnp.concatenate([tokens[m], z], axis=1)
      mask = jnp.concatenate([masks[m], jnp.ones(z.shape[:2], bool)], axis=1)
      bias = None if biases is None else jnp.concatenate(
          [biases[m], jnp.zeros(z.shape[:2], biases[m].dtype)], axis=1)
      y = EncoderBlock(**_block_kwargs(self.cfg), name=m)(x, mask, bias)
      out[m], z_m = y[:, :n], y[:, n:]
      zs.append(z_m)
    return out, sum(zs) / len(zs)


class Fusion(nn.Module):
  """(tokens: {modality: [b, n_m, d]}, masks: {modality: [b, n_m]}, sizes: optional
  {modality: [b, n_m]}) -> (fused tokens dict, intermediates)."""
  cfg: object  # ModelConfig

  @nn.compact
  def __call__(self, tokens, masks, sizes=None):
    f = self.cfg.fusion
    names = sorted(tokens)
    inter = {}
    biases = None if sizes is None else {m: size_bias(sizes[m]) for m in names}
    if f.kind == "cross":
      for i in range(f.num_layers):
        tokens = CrossLayer(self.cfg, name=f"layer_{i:02d}")(tokens, masks, biases)
        inter[f"layer_{i:02d}"] = tokens
    elif f.kind == "joint":
      d = self.cfg.d_model
      parts = [tokens[m] + self.param(f"type_embed_{m}", nn.initializers.normal(0.02), (d,))
               for m in names]
      x = jnp.concatenate(parts, axis=1)
      mask = jnp.concatenate([masks[m] for m in names], axis=1)
      bias = None if biases is None else jnp.concatenate([biases[m] for m in names], axis=1)
      for i in range(f.num_layers):
        x = EncoderBlock(**_block_kwargs(self.cfg), name=f"block_{i:02d}")(x, mask, bias)
        inter[f"block_{i:02d}"] = x
      sizes = [tokens[m].shape[1] for m in names]
      starts = [sum(sizes[:k]) for k in range(len(names))]
      tokens = {m: x[:, s:s + n] for m, s, n in zip(names, starts, sizes)}
    elif f.kind == "bottleneck":
      batch = tokens[names[0]].shape[0]
      z0 = self.param("bottleneck", nn.initializers.normal(0.02),
                      (f.num_bottleneck, self.cfg.d_model))
      z = jnp.broadcast_to(z0, (batch,) + z0.shape)
      for i in range(f.num_layers):
        tokens, z = BottleneckLayer(self.cfg, name=f"layer_{i:02d}")(tokens, masks, z, biases)
        inter[f"layer_{i:02d}"] = {"tokens": tokens, "bottleneck": z}
      inter["bottleneck"] = z
    else:
      raise ValueError(f"fusion.kind={f.kind!r} is unknown; valid: cross, joint, bottleneck.")
    return tokens, inter
