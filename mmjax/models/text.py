"""Text tower: byte tokens -> token + position embeddings -> encoder blocks."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.data.tokenizer import PAD_ID
from mmjax.models.layers import encode


class TextTower(nn.Module):
  """tokens int [batch, len<=max_len] (+ mask bool) -> (embeddings, intermediates).

  Without a mask, padding is wherever tokens == PAD_ID. Padded positions are zeroed and
  never attended to, so their content cannot change any real position's output.
  """
  tower: object  # TextConfig
  cfg: object  # ModelConfig

  @nn.compact
  def __call__(self, tokens, mask=None):
    t = self.tower
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"text input must be integer tokens [batch, length], got shape "
                       f"{tokens.shape} dtype {tokens.dtype}.")
    if tokens.shape[1] > t.max_len:
      raise ValueError(f"text length {tokens.shape[1]} exceeds the tower's max_len "
                       f"{t.max_len}; truncate the input or raise max_len in the config.")
    if mask is None:
      mask = tokens != PAD_ID
    elif mask.shape != tokens.shape:
      raise ValueError(f"text mask shape {mask.shape} must equal the tokens' {tokens.shape}.")
    mask = mask.astype(bool)
    d = self.cfg.d_model
    x = nn.Embed(t.vocab_size, d, embedding_init=nn.initializers.normal(0.02),
                 name="token_embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (t.max_len, d))
    x = (x + pos[:tokens.shape[1]]) * mask[..., None]
    inter = {"embed": x}
    return encode(x, mask, mask, self.cfg, t.num_layers, inter)
