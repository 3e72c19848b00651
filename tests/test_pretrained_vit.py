"""mmjax.pretrained.vit equals Hugging Face's ViTForImageClassification: the golden files
(tests/golden/make_golden.py, transformers in PyTorch, random weights) are loaded from
their safetensors and every block's tokens and the logits match the reference's within
1e-5 relative in float32. A checkpoint that does not fit is one error naming every key."""
import os
import shutil

import jax
import numpy as np
import pytest

from mmjax.pretrained import checkpoint_files, vit

import golden_files
from golden_files import rel as _rel

_args = lambda **over: golden_files.args("vit", **over)
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "vit")


def test_vit_equals_the_hugging_face_reference():
  fam = vit.family(_args())
  params = fam.load(os.path.join(GOLDEN, "model.safetensors"), fam.abstract_params())
  io = np.load(os.path.join(GOLDEN, "io.npz"))
  image = io["pixel_values"].transpose(0, 2, 3, 1)  # NCHW (torch) -> NHWC
  logits, inter = jax.jit(fam.apply)(params, {"image": image})
  hidden = io["hidden_states"]  # the embeddings, then each block's output
  for i in range(fam.args["depth"]):
    assert _rel(inter[f"block_{i:02d}"], hidden[i + 1]) < 1e-5, i
  assert _rel(logits, io["logits"]) < 1e-5
  assert np.argmax(logits, -1).tolist() == np.argmax(io["logits"], -1).tolist()


def test_a_checkpoint_that_does_not_fit_names_every_key(tmp_path):
  path = os.path.join(GOLDEN, "model.safetensors")
  deeper = vit.family(_args(depth=3))
  with pytest.raises(checkpoint_files.CheckpointError, match=r"16 missing \(vit.encoder.layer"
                     r".2.attention.attention.key.bias, .*Is it a checkpoint of this family "
                     r"and size\?"):
    deeper.load(path, deeper.abstract_params())
  wider = vit.family(_args(width=48, heads=4))
  with pytest.raises(checkpoint_files.CheckpointError, match=r"mis-shaped \(vit.embeddings."
                     r"cls_token: \(1, 1, 32\) in the checkpoint, \(1, 1, 48\) for cls"):
    wider.load(path, wider.abstract_params())
  headless = vit.family(_args(num_classes=0))
  with pytest.raises(checkpoint_files.CheckpointError, match=r"2 unexpected \(classifier.bias,"
                     r" classifier.weight\)"):
    headless.load(path, headless.abstract_params())

  truncated = tmp_path / "model.safetensors"
  with open(path, "rb") as f:
    truncated.write_bytes(f.read()[:50_000])
  fam = vit.family(_args())
  with pytest.raises(checkpoint_files.CheckpointError, match=r"is not a readable safetensors "
                     r"file .*truncated"):
    fam.load(str(truncated), fam.abstract_params())
  with pytest.raises(checkpoint_files.CheckpointError, match=r"no such file; .*nothing is "
                     r"downloaded"):
    fam.load(str(tmp_path / "absent.safetensors"), fam.abstract_params())
  shutil.copy(path, tmp_path / "model.npz")  # safetensors bytes under a big_vision name
  with pytest.raises(checkpoint_files.CheckpointError, match=r"model.npz is not a readable "
                     r".npz file .*truncated"):
    fam.load(str(tmp_path / "model.npz"), fam.abstract_params())


@pytest.mark.parametrize("args, message", [
    (dict(variant="B/x"), r"variant='B/x' is unknown; valid: Ti/16, S/16, B/16"),
    (dict(variant=None, width=32), r"depth, heads, mlp_dim, patch not set"),
    (dict(variant="B/16", image_size=100), r"image_size=100 is not a multiple of patch=16"),
    (dict(dropout=0.1), r"unknown field\(s\) \['dropout'\] for mmjax.pretrained.vit"),
])
def test_bad_model_arguments_are_one_line(args, message):
  with pytest.raises(ValueError, match=message):
    vit.family(args)


def test_variants_have_the_published_sizes():
  """ViT-B/16 at 224 with a 1000-class head: as many parameters as transformers'
  ViTForImageClassification with its default config and 1000 labels."""
  fam = vit.family(dict(variant="B/16"))
  n = sum(int(np.prod(s)) for s in fam.param_shapes().values())
  assert n == 86_567_656
