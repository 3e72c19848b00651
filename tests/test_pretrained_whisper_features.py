"""Whisper's log-mel front end (mmjax.pretrained.whisper_features) equals transformers'
WhisperFeatureExtractor on the golden waveforms (tests/golden/make_golden.py: three clips
of 1 s, 0.56 s and 0.16 s zero-padded to 1 s, one with a loud part so the 80 dB clamp
acts) within 1e-5 relative in float32, jitted; and the Whisper family fed audio computes
it inside its forward."""
import os

import jax
import numpy as np
import pytest

from mmjax.pretrained import whisper, whisper_features
from test_pretrained_whisper import GOLDEN, _args, _rel


def test_log_mel_equals_the_reference_feature_extractor():
  io = np.load(os.path.join(GOLDEN, "whisper_features", "io.npz"))
  got = jax.jit(whisper_features.log_mel)(io["waveform"])
  want = io["input_features"].transpose(0, 2, 1)  # [b, mels, frames] -> [b, frames, mels]
  assert got.shape == want.shape == (3, 100, 80)
  assert _rel(got, want) < 1e-5
  # the clamp: each example's floor is its own maximum minus 80 dB (2.0 after scaling)
  for g in np.asarray(got):
    assert g.min() >= g.max() - 2.0 - 1e-6
  with pytest.raises(ValueError, match=r"log_mel takes \[batch, samples\] audio, got shape "
                     r"\(16000,\)"):
    whisper_features.log_mel(io["waveform"][0])


def test_the_family_fed_audio_runs_the_front_end_in_its_forward():
  io = np.load(os.path.join(GOLDEN, "whisper_features", "io.npz"))
  audio_fam = whisper.family(_args(input="audio", n_mels=80, max_positions=50))
  mel_fam = whisper.family(_args(n_mels=80, max_positions=50))
  assert audio_fam.modalities == ("audio",) and mel_fam.modalities == ("mel",)
  params = jax.jit(mel_fam.init)(jax.random.PRNGKey(0), mel_fam.example_batch(1))
  from_audio, _ = jax.jit(audio_fam.apply)(params, {"audio": io["waveform"]})
  from_mel, _ = jax.jit(mel_fam.apply)(params, {"mel": io["input_features"].transpose(0, 2, 1)})
  assert _rel(from_audio, from_mel) < 1e-4
  with pytest.raises(ValueError, match=r"config.model.input='wav' is unknown; valid: mel, "
                     "audio"):
    whisper.family(_args(input="wav"))
