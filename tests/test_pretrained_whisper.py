"""mmjax.pretrained.whisper equals the encoder of Hugging Face's WhisperModel on the golden
files (tests/golden/make_golden.py: random weights, 16 frames of 8 mel bins): the first
block's states and the final (normalized) states within 1e-5 relative in float32; the
decoder's tensors are left aside; a classification head starts at zero."""
import os

import jax
import numpy as np
import pytest

from mmjax.compress import flatten
from mmjax.pretrained import checkpoint_files, whisper

import golden_files
from golden_files import rel as _rel

_args = lambda **over: golden_files.args("whisper", **over)
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def _load(**over):
  fam = whisper.family(_args(**over))
  return fam, fam.load(os.path.join(GOLDEN, "whisper", "model.safetensors"),
                       fam.abstract_params())


def test_whisper_encoder_equals_the_hugging_face_reference():
  fam, params = _load()
  io = np.load(os.path.join(GOLDEN, "whisper", "io.npz"))
  mel = io["input_features"].transpose(0, 2, 1)  # [b, mels, frames] -> [b, frames, mels]
  pooled, inter = jax.jit(fam.apply)(params, {"mel": mel})
  assert _rel(inter["block_00"], io["hidden_states"][1]) < 1e-5
  assert _rel(inter["final"], io["last_hidden_state"]) < 1e-5
  assert _rel(pooled, io["last_hidden_state"].mean(1)) < 1e-5

  # a speech-classification head: not in the checkpoint, starts at zero
  fam, params = _load(num_classes=12)
  logits, _ = jax.jit(fam.apply)(params, {"mel": mel})
  assert logits.shape == (3, 12) and not np.asarray(logits).any()
  assert not flatten(params)["head/kernel"].any()


def test_bad_inputs_are_one_line():
  fam, params = _load()
  with pytest.raises(ValueError, match=r"log-mel features \[batch, frames, 8\], got \(2, 16, 80\)"):
    fam.apply(params, {"mel": np.zeros((2, 16, 80), np.float32)})
  with pytest.raises(ValueError, match=r"40 frames give 20 positions, more than the 8"):
    fam.apply(params, {"mel": np.zeros((1, 40, 8), np.float32)})
  deeper = whisper.family(_args(depth=3))
  with pytest.raises(checkpoint_files.CheckpointError, match=r"Whisper checkpoint .*: .*"
                     r"missing \(encoder.layers.2.fc1.bias"):
    deeper.load(os.path.join(GOLDEN, "whisper", "model.safetensors"), deeper.abstract_params())
  with pytest.raises(ValueError, match=r"variant='huge' is unknown; valid: tiny, base, small"):
    whisper.family({"variant": "huge"})


def test_variants_have_the_published_sizes():
  """Whisper base's encoder: as many parameters as transformers' WhisperModel(base).encoder."""
  n = sum(int(np.prod(s)) for s in whisper.family({"variant": "base"}).param_shapes().values())
  assert n == 20_590_592
