"""Audio tower: waveform -> log-mel (in JAX) -> (time, mel) patch embedding -> blocks."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.audio_features import frame_mask, log_mel_spectrogram
from mmjax.models.layers import compute_dtype, encode


class AudioTower(nn.Module):
  """wave float [batch, num_samples] (+ mask bool, True = real sample) ->
  (embeddings, intermediates).

  Padded samples are zeroed before the spectrogram, and a token is real when its first
  frame starts on a real sample, so padding content never reaches the output.
  """
  tower: object  # AudioConfig
  cfg: object  # ModelConfig

  @nn.compact
  def __call__(self, wave, mask=None):
    t = self.tower
    if wave.ndim != 2 or wave.shape[1] != t.num_samples:
      raise ValueError(f"audio input must be a waveform [batch, {t.num_samples}] "
                       f"(AudioConfig.num_samples; pad shorter clips and pass audio_mask), "
                       f"got shape {wave.shape}.")
    if mask is None:
      mask = jnp.ones(wave.shape, bool)
    elif mask.shape != wave.shape:
      raise ValueError(f"audio mask shape {mask.shape} must equal the waveform's {wave.shape}.")
    mask = mask.astype(bool)
    wave = jnp.where(mask, wave, 0.0)
    nt, nf = t.grid
    spec = log_mel_spectrogram(wave, t)[:, :nt * t.patch_time]  # [b, frames, mels]
    d = self.cfg.d_model
    x = nn.Conv(d, (t.patch_time, t.patch_freq), strides=(t.patch_time, t.patch_freq),
                padding="VALID", dtype=compute_dtype(self.cfg),
                name="patch_embed")(spec[..., None])  # [b, nt, nf, d]
    x = x.reshape(x.shape[0], nt * nf, d)
    x = x + self.param("pos_embed", nn.initializers.normal(0.02), (t.num_tokens, d))
    frames = frame_mask(mask, t)[:, :nt * t.patch_time:t.patch_time]  # [b, nt]
    token_mask = jnp.repeat(frames, nf, axis=1)  # token (i, j) -> index i * nf + j
    x = x * token_mask[..., None]
    inter = {"log_mel": spec, "embed": x}
    return encode(x, token_mask, token_mask, self.cfg, t.num_layers, inter)
