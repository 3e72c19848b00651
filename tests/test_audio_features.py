"""Log-mel front end against a float64 NumPy implementation."""
import numpy as np

from mmjax.models import get_preset
from mmjax.models.audio_features import frame_mask, log_mel_spectrogram, mel_filterbank


def test_filterbank_is_triangular_and_covers_the_band():
  fb = mel_filterbank(8000, 256, 16)
  assert fb.shape == (129, 16)
  assert np.all(fb >= 0) and np.all(fb.max(axis=0) > 0.5)
  peaks = fb.argmax(axis=0)
  assert np.all(np.diff(peaks) > 0), "filter centres must rise with the mel index"


def test_log_mel_matches_numpy_float64():
  cfg = get_preset("tiny").towers["audio"]
  rng = np.random.default_rng(0)
  t = np.arange(cfg.num_samples) / cfg.sample_rate
  wave = (0.5 * np.sin(2 * np.pi * 440 * t)[None] + 0.1 * rng.normal(size=(2, t.size)))
  got = np.asarray(log_mel_spectrogram(wave.astype(np.float32), cfg))
  n_frames = 1 + (cfg.num_samples - cfg.n_fft) // cfg.hop_length
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)
  frames = np.stack([wave[:, i * cfg.hop_length:i * cfg.hop_length + cfg.n_fft]
                     for i in range(n_frames)], axis=1)
  power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
  want = np.log(power @ mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels).astype(
      np.float64) + 1e-6)
  assert got.shape == (2, n_frames, cfg.n_mels)
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)
  # the 440 Hz tone lands in the filter whose centre is nearest 440 Hz
  fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
  freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
  assert abs(freqs[fb[:, got[0].mean(0).argmax()].argmax()] - 440) < 200


def test_frame_mask_follows_clip_length():
  cfg = get_preset("tiny").towers["audio"]
  mask = np.arange(cfg.num_samples)[None] < 1000
  fm = np.asarray(frame_mask(mask, cfg))
  assert fm[0].sum() == len(range(0, 1000, cfg.hop_length))
