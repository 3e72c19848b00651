"""Procedural "spoken" digits: a two-formant tone pattern per digit (NumPy only).

A digit is a pair of formant frequencies (f1 from 3 values, f2 from 4, spaced >= 30% apart
so the pattern survives a voice's pitch shift), amplitude-modulated at the voice's
fundamental (a glottal buzz), under a syllable envelope of random duration and onset, plus
noise. A *voice* fixes the pitch factor, the fundamental and the brightness; each
utterance adds its own.
"""
from __future__ import annotations

import numpy as np

SAMPLE_RATE = 8000
NUM_SAMPLES = 8000  # one second
_F1 = (380.0, 620.0, 1000.0)
_F2 = (1450.0, 1950.0, 2600.0, 3350.0)
FORMANTS = {d: (_F1[d % 3], _F2[d // 3 if d < 9 else 3]) for d in range(10)}


def voice_style(voice_id: int) -> dict:
  r = np.random.default_rng(20_000 + voice_id)
  return dict(pitch=r.uniform(0.93, 1.07), f0=r.uniform(90.0, 240.0),
              brightness=r.uniform(0.3, 0.8))


def speak_digit(digit: int, voice_id: int, rng: np.random.Generator,
                num_samples: int = NUM_SAMPLES, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """One utterance of `digit` by `voice_id`: int16 [num_samples]."""
  v = voice_style(voice_id)
  f1, f2 = (f * v["pitch"] * rng.uniform(0.98, 1.02) for f in FORMANTS[digit])
  dur = rng.uniform(0.3, 0.6)
  n = int(dur * sample_rate)
  onset = rng.integers(0, num_samples - n)
  t = np.arange(n, dtype=np.float32) / sample_rate
  vibrato = 1.0 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
  phase = 2 * np.pi * np.cumsum(vibrato) / sample_rate
  sig = np.sin(phase * f1) + v["brightness"] * np.sin(phase * f2 + rng.uniform(0, 2 * np.pi))
  sig = sig * (0.6 + 0.4 * np.sin(phase * v["f0"] * rng.uniform(0.9, 1.1)))  # glottal buzz
  attack, release = int(0.03 * sample_rate), int(0.08 * sample_rate)
  env = np.ones(n, np.float32)
  env[:attack] = np.linspace(0, 1, attack)
  env[-release:] = np.linspace(1, 0, release)
  out = np.zeros(num_samples, np.float32)
  out[onset:onset + n] = sig * env * rng.uniform(0.3, 0.8)
  out += rng.normal(0, rng.uniform(0.005, 0.04), size=num_samples)
  return (np.clip(out, -1, 1) * 32767).astype(np.int16)
