"""Image tower (ViT): pixels -> strided-conv patch embedding + positions -> blocks."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import compute_dtype, encode


class ImageTower(nn.Module):
  """pixels float [batch, height, width, channels] -> (embeddings, intermediates)."""
  tower: object  # ImageConfig
  cfg: object  # ModelConfig

  @nn.compact
  def __call__(self, pixels, mask=None):
    t = self.tower
    want = tuple(t.image_size) + (t.channels,)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
      raise ValueError(f"image input must be [batch, {want[0]}, {want[1]}, {want[2]}] "
                       f"(ImageConfig.image_size/channels), got shape {pixels.shape}.")
    p, d = t.patch_size, self.cfg.d_model
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=compute_dtype(self.cfg),
                name="patch_embed")(pixels.astype(jnp.float32))
    x = x.reshape(x.shape[0], -1, d)
    x = x + self.param("pos_embed", nn.initializers.normal(0.02), (t.num_tokens, d))
    token_mask = jnp.ones(x.shape[:2], bool)
    inter = {"embed": x}
    return encode(x, None, token_mask, self.cfg, t.num_layers, inter)
