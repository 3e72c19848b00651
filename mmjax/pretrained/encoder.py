"""The transformer block the pretrained families share, on mmjax's attention kernel
(`mmjax.models.layers.MultiHeadAttention`: 2-D [in, out] projections named query, key,
value, out; `Mlp`: fc1, fc2), so every compression rule and layout that fits mmjax's own
models fits these. What differs between families is a field: the LayerNorm epsilon (ViT
and BERT 1e-12, CLIP and Whisper 1e-5, SigLIP 1e-6), pre-LN (ViT, CLIP, SigLIP, Whisper)
or post-LN (BERT), and the GELU (exact erf, or tanh-approximate)."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn

from mmjax.models.layers import MultiHeadAttention, Mlp


class Block(nn.Module):
  """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x)); post-LN: ln(x + attn(x)), then
  ln(x + mlp(x))."""
  num_heads: int
  mlp_dim: int
  eps: float = 1e-6
  post_ln: bool = False
  gelu_approximate: bool = False
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x, mask=None):
    attn = MultiHeadAttention(self.num_heads, self.implementation, name="attn")
    mlp = Mlp(self.mlp_dim, self.gelu_approximate, name="mlp")
    ln_attn = nn.LayerNorm(self.eps, name="ln_attn")
    ln_mlp = nn.LayerNorm(self.eps, name="ln_mlp")
    if self.post_ln:
      x = ln_attn(x + attn(x, context_mask=mask))
      return ln_mlp(x + mlp(x))
    x = x + attn(ln_attn(x), context_mask=mask)
    return x + mlp(ln_mlp(x))


def encode(x, mask, depth: int, block: dict, intermediates: dict):
  """`depth` Blocks named block_00, block_01, ... in the calling module (call from inside
  an `nn.compact` method), each block's output recorded."""
  for i in range(depth):
    name = f"block_{i:02d}"
    x = intermediates[name] = Block(**block, name=name)(x, mask)
  return x
