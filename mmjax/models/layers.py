"""Transformer building blocks on `mmjax.kernels.attention`: attention (self and cross), MLP,
pre-LayerNorm blocks.

Every projection is a plain 2-D `nn.Dense` ([in, out] kernels, heads laid out as
contiguous column groups of `head_dim`), so compression transforms see one kernel layout:
N:M groups run along axis 0, a head is a slice of columns of query/key/value and of rows
of `out`. Parameter paths read like `text/block_03/attn/query/kernel`.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.kernels.attention import dot_product_attention


def key_padding_mask(mask):
  """[batch, kv_len] bool (True = real token) -> broadcastable attention mask."""
  return None if mask is None else mask[:, None, None, :]


class MultiHeadAttention(nn.Module):
  """Queries from `x`, keys/values from `context` (default: `x` itself).

  Heads are `head_dim` wide (default d / num_heads); a structurally pruned model keeps
  its head_dim and has fewer heads, so q/k/v are [d, num_heads * head_dim]."""
  num_heads: int
  implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  head_dim: Optional[int] = None

  @nn.compact
  def __call__(self, x, context=None, *, context_mask=None, logit_bias=None):
    """`context_mask` [batch, kv_len] bool (True = a real token); `logit_bias` [batch,
    kv_len] added to every query's logits for that key (token merging's log-size)."""
    context = x if context is None else context
    d = x.shape[-1]
    if self.head_dim is None and d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}.")
    hd = self.head_dim or d // self.num_heads
    inner = self.num_heads * hd
    dense = lambda name: nn.Dense(inner, dtype=self.dtype, name=name)
    split = lambda y: y.reshape(y.shape[:2] + (self.num_heads, hd))
    q = split(dense("query")(x))
    k = split(dense("key")(context))
    v = split(dense("value")(context))
    out = dot_product_attention(q, k, v, mask=key_padding_mask(context_mask),
                                bias=key_padding_mask(logit_bias),
                                implementation=self.implementation)
    return nn.Dense(d, dtype=self.dtype, name="out")(out.reshape(out.shape[:2] + (inner,)))


class Mlp(nn.Module):
  """fc2(gelu(fc1(x))), or with `gated` fc2(gelu(fc1(x)) * gate(x)) (GEGLU). Hidden unit j
  is column j of fc1 (and gate) and row j of fc2."""
  hidden_dim: int
  gelu_approximate: bool = True
  gated: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
    h = nn.gelu(h, approximate=self.gelu_approximate)
    if self.gated:
      h = h * nn.Dense(self.hidden_dim, dtype=self.dtype, name="gate")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class PostAttention(nn.Module):
  """The identity, as a module: where a block's tokens are after the attention's residual
  and before the MLP, a place a module hook can reach (token merging merges here, as ToMe
  does, so the MLP already runs on fewer tokens). No parameters: paths are unchanged."""

  def __call__(self, x):
    return x


class _Block(nn.Module):
  """The body both blocks share: x + attention(queries, keys/values), then
  x + mlp(ln(x)); a subclass says how the attention's inputs are normalised."""
  num_heads: int
  mlp_dim: int
  implementation: Optional[str] = None
  gelu_approximate: bool = True
  mlp_gated: bool = False
  dtype: jnp.dtype = jnp.float32
  head_dim: Optional[int] = None

  def body(self, x, queries, context, context_mask, attn_name, context_bias=None):
    x = x + MultiHeadAttention(self.num_heads, self.implementation, self.dtype, self.head_dim,
                               name=attn_name)(queries, context, context_mask=context_mask,
                                               logit_bias=context_bias)
    x = PostAttention(name="post_attn")(x)
    h = nn.LayerNorm(name="ln_mlp")(x)
    return x + Mlp(self.mlp_dim, self.gelu_approximate, self.mlp_gated, self.dtype,
                   name="mlp")(h)


class EncoderBlock(_Block):
  """Pre-LN self-attention block: x + attn(ln(x)), then x + mlp(ln(x))."""

  @nn.compact
  def __call__(self, x, mask=None, bias=None):
    h = nn.LayerNorm(name="ln_attn")(x)
    return self.body(x, h, None, mask, "attn", bias)


class CrossBlock(_Block):
  """Pre-LN cross-attention block: queries from x, keys/values from another modality."""

  @nn.compact
  def __call__(self, x, context, context_mask=None, context_bias=None):
    h = nn.LayerNorm(name="ln_query")(x)
    c = nn.LayerNorm(name="ln_context")(context)
    return self.body(x, h, c, context_mask, "cross_attn", context_bias)


def compute_dtype(cfg):
  return jnp.dtype(cfg.dtype)


def encode(x, attn_mask, token_mask, cfg, num_layers: int, intermediates: dict):
  """A tower's body and epilogue: `num_layers` EncoderBlocks named block_00, block_01, ...
  in the calling module, then its final LayerNorm; every block's output, the final tokens
  and their mask are recorded. Call from inside an `nn.compact` method; -> (x, inter)."""
  for i in range(num_layers):
    name = f"block_{i:02d}"
    x = EncoderBlock(cfg.num_heads, cfg.mlp_dim, cfg.attention_impl, cfg.gelu_approximate,
                     cfg.mlp_gated, compute_dtype(cfg), cfg.head_dim, name=name)(x, attn_mask)
    intermediates[name] = x
  x = nn.LayerNorm(name="ln_final")(x)
  intermediates["final"] = x
  intermediates["mask"] = token_mask
  return x, intermediates

