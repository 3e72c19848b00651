"""Log-mel spectrogram in JAX: framing, Hann window, |rfft|², HTK mel filterbank, log.

No centring/padding: frame t covers samples [t*hop, t*hop + n_fft), so a frame's validity
follows from the clip length alone. The filterbank is a NumPy constant built at trace time.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LOG_EPS = 1e-6


def hz_to_mel(f):
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate, n_fft, n_mels, f_min=0.0, f_max=None) -> np.ndarray:
  """Triangular filters, [n_fft // 2 + 1, n_mels], float32."""
  f_max = sample_rate / 2 if f_max is None else f_max
  freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
  edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
  lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
  up = (freqs[:, None] - lo) / (mid - lo)
  down = (hi - freqs[:, None]) / (hi - mid)
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel_spectrogram(wave, cfg):
  """wave float [batch, num_samples] -> log-mel [batch, num_frames, n_mels] (float32)."""
  n_frames = 1 + (wave.shape[-1] - cfg.n_fft) // cfg.hop_length
  idx = np.arange(n_frames)[:, None] * cfg.hop_length + np.arange(cfg.n_fft)[None, :]
  frames = wave.astype(jnp.float32)[:, idx]  # [batch, frames, n_fft]
  window = np.hanning(cfg.n_fft + 1)[:-1].astype(np.float32)  # periodic Hann
  power = jnp.abs(jnp.fft.rfft(frames * window, axis=-1)) ** 2
  fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
  return jnp.log(power @ fb + LOG_EPS)


def frame_mask(sample_mask, cfg):
  """[batch, num_samples] bool -> [batch, num_frames] bool: frames starting on real audio."""
  n_frames = 1 + (sample_mask.shape[-1] - cfg.n_fft) // cfg.hop_length
  starts = np.arange(n_frames) * cfg.hop_length
  return sample_mask[:, starts]
