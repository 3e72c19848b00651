"""Whisper's log-mel front end, in JAX (jittable, so it can run in the input pipeline or
inside a deployed program): 16 kHz audio -> `[batch, frames, n_mels]` as Whisper's
feature extractor computes it, written from its definition (Radford et al. 2022):

  * a 400-sample periodic Hann window every 160 samples (25 ms, 10 ms), the signal
    reflect-padded by 200 at both ends, the last frame dropped: `samples // 160` frames;
  * the power spectrum |rfft|² (201 bins) through `n_mels` triangular filters on the
    Slaney mel scale (linear below 1 kHz, logarithmic above), 0-8 kHz, Slaney-normalized
    (each filter's area constant);
  * log10 of max(energy, 1e-10); per example, values more than 8 (80 dB) below the
    example's maximum raised to it; then (x + 4) / 4.
Whisper's own input is 30 s padded with zeros (480,000 samples: 3000 frames); pad first.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SAMPLE_RATE, N_FFT, HOP = 16000, 400, 160


def _hz_to_mel(f):
  f = np.asarray(f, np.float64)
  logstep = np.log(6.4) / 27.0
  return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0)
                  / logstep)


def _mel_to_hz(m):
  m = np.asarray(m, np.float64)
  logstep = np.log(6.4) / 27.0
  return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(logstep * (m - 15.0)))


def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                fmax: float = 8000.0) -> np.ndarray:
  """[n_fft // 2 + 1, n_mels] Slaney-scale, Slaney-normalized triangular filters."""
  edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), n_mels + 2))
  freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  rise = (freqs[:, None] - lower) / (center - lower)
  fall = (upper - freqs[:, None]) / (upper - center)
  tri = np.maximum(0.0, np.minimum(rise, fall))
  return (tri * (2.0 / (upper - lower))).astype(np.float32)


def log_mel(waveform, n_mels: int = 80):
  """[batch, samples] float audio at 16 kHz -> [batch, samples // 160, n_mels]."""
  x = jnp.asarray(waveform, jnp.float32)
  if x.ndim != 2:
    raise ValueError(f"log_mel takes [batch, samples] audio, got shape {tuple(x.shape)}.")
  x = jnp.pad(x, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
  n_frames = 1 + (x.shape[1] - N_FFT) // HOP
  idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
  window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
  spec = jnp.fft.rfft(x[:, idx] * window, axis=-1)
  power = (spec.real ** 2 + spec.imag ** 2)[:, :-1]  # the last frame dropped
  mel = jnp.log10(jnp.maximum(power @ mel_filters(n_mels), 1e-10))
  mel = jnp.maximum(mel, mel.max(axis=(1, 2), keepdims=True) - 8.0)
  return (mel + 4.0) / 4.0
