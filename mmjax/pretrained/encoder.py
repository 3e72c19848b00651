"""The transformer block the pretrained families share, on mmjax's attention kernel
(`mmjax.kernels.attention.dot_product_attention`), with mmjax's parameter names (`attn/query`,
`key`, `value`, `out`; `mlp/fc1`, `fc2`: 2-D [in, out] kernels), so every compression rule
and layout that fits mmjax's own models fits these. What differs between families is a
field: the LayerNorm epsilon (ViT and BERT 1e-12, CLIP and Whisper 1e-5, SigLIP 1e-6),
pre-LN (ViT, CLIP, SigLIP, Whisper) or post-LN (BERT), the MLP's activation (exact GELU,
tanh GELU, CLIP's quick GELU), and a causal mask (CLIP's text tower)."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.kernels.attention import dot_product_attention
from mmjax.models.layers import PostAttention

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class SelfAttention(nn.Module):
  """Multi-head self-attention; `mask` [batch, kv_len] (True = a real token), `causal`."""
  num_heads: int
  causal: bool = False
  implementation: Optional[str] = None
  key_bias: bool = True  # Whisper's key projection has none

  @nn.compact
  def __call__(self, x, mask=None, logit_bias=None):
    """`logit_bias` [batch, kv_len]: added to every query's logits for that key (token
    merging's log-size)."""
    d = x.shape[-1]
    hd = d // self.num_heads
    split = lambda y: y.reshape(y.shape[:2] + (self.num_heads, hd))
    q, k, v = (split(nn.Dense(d, use_bias=self.key_bias or n != "key", name=n)(x))
               for n in ("query", "key", "value"))
    out = dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :],
                                bias=None if logit_bias is None else logit_bias[:, None, None],
                                is_causal=self.causal, implementation=self.implementation)
    return nn.Dense(d, name="out")(out.reshape(x.shape[:2] + (d,)))


class Mlp(nn.Module):
  hidden_dim: int
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x):
    h = ACTIVATIONS[self.activation](nn.Dense(self.hidden_dim, name="fc1")(x))
    return nn.Dense(x.shape[-1], name="fc2")(h)


class Block(nn.Module):
  """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x)); post-LN: ln(x + attn(x)), then
  ln(x + mlp(x))."""
  num_heads: int
  mlp_dim: int
  eps: float = 1e-6
  post_ln: bool = False
  activation: str = "gelu"
  causal: bool = False
  implementation: Optional[str] = None
  key_bias: bool = True

  @nn.compact
  def __call__(self, x, mask=None):
    attn = SelfAttention(self.num_heads, self.causal, self.implementation, self.key_bias,
                         name="attn")
    mlp = Mlp(self.mlp_dim, self.activation, name="mlp")
    ln_attn = nn.LayerNorm(self.eps, name="ln_attn")
    ln_mlp = nn.LayerNorm(self.eps, name="ln_mlp")
    post_attn = PostAttention(name="post_attn")  # a place for hooks (token merging)
    if self.post_ln:
      x = post_attn(ln_attn(x + attn(x, mask)))
      return ln_mlp(x + mlp(x))
    x = post_attn(x + attn(ln_attn(x), mask))
    return x + mlp(ln_mlp(x))


def encode(x, mask, depth: int, block: dict, intermediates: dict, prefix: str = ""):
  """`depth` Blocks named block_00, block_01, ... in the calling module (call from inside
  an `nn.compact` method), each block's output recorded (under `prefix` + its name)."""
  for i in range(depth):
    name = f"block_{i:02d}"
    x = intermediates[prefix + name] = Block(**block, name=name)(x, mask)
  return x


class Tower(nn.Module):
  """A tower's blocks under its own name (`image/block_00/...`, `text/block_00/...`), so
  each tower of a two-tower model has its own paths."""
  block: dict
  depth: int

  @nn.compact
  def __call__(self, x, inter, mask=None):
    return encode(x, mask, self.depth, self.block, inter, prefix=f"{self.name}/")


def check_activation(name: str, where: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"{where}={name!r} is unknown; valid: {', '.join(ACTIVATIONS)}.")
  return name


def pooled_at(x, index):
  """x [batch, len, d] at one position per example."""
  return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
