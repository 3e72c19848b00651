"""Spoken digits from the espeak-ng synthesizer (offline), for mm_arith/real.

A voice is (English voice, variant, rate, pitch); test voices use variants never heard in
training. Clips are synthesised on demand, cached per (voice, digit), trimmed of silence,
resampled to 8 kHz and placed at a random onset with random gain and noise.
"""
from __future__ import annotations

import functools
import io
import shutil
import subprocess
import wave

import numpy as np

from mmjax.data.tones import NUM_SAMPLES, SAMPLE_RATE

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LANGUAGES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan",
             "en-gb-x-gbcwmd", "en-us-nyc")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4", "klatt",
                  "klatt2", "Alex", "Andrea", "Michael", "belinda")
TEST_VARIANTS = ("m7", "f5", "klatt3", "Alicia")
INSTALL_HINT = ("espeak-ng is needed for mm_arith/real audio but was not found on PATH. "
                "Install it: `sudo apt-get install espeak-ng` (Debian/Ubuntu), "
                "`sudo dnf install espeak-ng` (Fedora) or `brew install espeak-ng` (macOS); "
                "`./launch.sh setup` installs it by itself when run as root on Debian. "
                "Or use the NumPy-only config mm_arith/procedural.")


def espeak_binary() -> str:
  exe = shutil.which("espeak-ng")
  if exe is None:
    raise RuntimeError(INSTALL_HINT)
  return exe


def voices(split: str) -> list[tuple[str, str, int, int]]:
  """The voice pool of a split: (language, variant, words/min, pitch 0-99)."""
  variants = TRAIN_VARIANTS if split == "train" else TEST_VARIANTS
  rng = np.random.default_rng(7 if split == "train" else 8)
  return [(lang, var, int(rng.integers(120, 221)), int(rng.integers(20, 81)))
          for lang in LANGUAGES for var in variants]


def _resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Band-limited resampling by truncating the spectrum."""
  n_out = int(round(len(x) * rate_out / rate_in))
  spec = np.fft.rfft(x)[:n_out // 2 + 1]
  return np.fft.irfft(spec, n_out) * (n_out / len(x))


@functools.lru_cache(maxsize=4096)
def synthesize(voice: tuple, digit: int) -> np.ndarray:
  """float32 waveform at 8 kHz of `digit` spoken by `voice`, silence trimmed."""
  lang, variant, rate, pitch = voice
  cmd = [espeak_binary(), "-v", f"{lang}+{variant}", "-s", str(rate), "-p", str(pitch),
         "--stdout", WORDS[digit]]
  out = subprocess.run(cmd, capture_output=True, check=True, timeout=30).stdout
  with wave.open(io.BytesIO(out)) as w:
    rate_in = w.getframerate()
    x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
  x = _resample(x, rate_in, SAMPLE_RATE)
  loud = np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())
  x = x[loud[0]:loud[-1] + 1] if loud.size else x
  return x[:NUM_SAMPLES].astype(np.float32)


def speak_digit(digit: int, voice: tuple, rng: np.random.Generator) -> np.ndarray:
  """One utterance: int16 [NUM_SAMPLES] with random onset, gain and background noise."""
  clip = synthesize(voice, digit)
  out = np.zeros(NUM_SAMPLES, np.float32)
  onset = int(rng.integers(0, NUM_SAMPLES - len(clip) + 1))
  out[onset:onset + len(clip)] = clip * rng.uniform(0.5, 1.0) / max(np.abs(clip).max(), 1e-3)
  out += rng.normal(0, rng.uniform(0.002, 0.02), size=NUM_SAMPLES)
  return (np.clip(out, -1, 1) * 32767).astype(np.int16)
