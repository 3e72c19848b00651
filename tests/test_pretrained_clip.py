"""mmjax.pretrained.clip equals Hugging Face's CLIPModel on the golden files
(tests/golden/make_golden.py: random weights, texts of 16, 9 and 4 tokens padded to 16):
image and text embeddings, every image block, the text tower's final tokens and the
image-text logits within 1e-5 relative in float32; and mmjax.tasks.retrieval reads its
outputs as CLIP does."""
import os

import jax
import numpy as np
import pytest

from mmjax.pretrained import checkpoint_files, clip
from mmjax.tasks import retrieval

import golden_files
from golden_files import rel as _rel, unit as _unit

_args = lambda **over: golden_files.args("clip", **over)
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def test_clip_equals_the_hugging_face_reference():
  fam = clip.family(_args())
  params = fam.load(os.path.join(GOLDEN, "clip", "model.safetensors"), fam.abstract_params())
  io = np.load(os.path.join(GOLDEN, "clip", "io.npz"))
  batch = {"image": io["pixel_values"].transpose(0, 2, 3, 1),
           "text": io["input_ids"].astype(np.int32), "text_mask": io["attention_mask"] > 0}
  out, inter = jax.jit(fam.apply)(params, batch)
  assert _rel(_unit(out["image"]), io["image_embeds"]) < 1e-5
  assert _rel(_unit(out["text"]), io["text_embeds"]) < 1e-5
  for i in range(fam.args["image"]["depth"]):
    assert _rel(inter[f"image/block_{i:02d}"], io["vision_hidden"][i + 1]) < 1e-5
  real = io["attention_mask"] > 0
  assert _rel(np.asarray(inter["text/final"])[real], io["text_hidden"][real]) < 1e-5
  logits = np.exp(float(out["logit_scale"])) * _unit(out["image"]) @ _unit(out["text"]).T
  assert _rel(logits, io["logits_per_image"]) < 1e-5

  # the retrieval task's softmax loss is CLIP's: the mean of both directions' CE
  loss, _ = retrieval.task({}, fam).loss(out, {"example_mask": np.ones(3, bool)})
  ce = lambda z: -np.mean(np.diag(z - np.log(np.exp(z).sum(1, keepdims=True))))
  z = np.asarray(io["logits_per_image"], np.float64)
  assert float(loss) == pytest.approx(0.5 * (ce(z) + ce(z.T)), rel=1e-5)


def test_a_checkpoint_of_another_family_or_size_names_its_keys():
  fam = clip.family(_args())
  with pytest.raises(checkpoint_files.CheckpointError, match=r"CLIP checkpoint .*vit/model."
                     r"safetensors: the checkpoint does not fit the configured model: \d+ "
                     r"missing \(logit_scale, text_model.*; \d+ unexpected \(classifier.bias"):
    fam.load(os.path.join(GOLDEN, "vit", "model.safetensors"), fam.abstract_params())
  other = clip.family(_args(dim=24))
  with pytest.raises(checkpoint_files.CheckpointError, match=r"2 mis-shaped \(visual_projection"
                     r".weight: \(16, 32\) in the checkpoint, \(32, 24\) for image_proj/kernel; "
                     r"text_projection.weight"):
    other.load(os.path.join(GOLDEN, "clip", "model.safetensors"), other.abstract_params())


def test_bad_inputs_are_one_line():
  with pytest.raises(ValueError, match=r"config.model.activation='relu' is unknown; valid: "
                     "gelu, gelu_tanh, quick_gelu"):
    clip.family(_args(activation="relu"))
  with pytest.raises(ValueError, match=r"config.model.variant='B' is unknown"):
    clip.family({"variant": "B"})
  fam = clip.family(_args())
  params = fam.load(os.path.join(GOLDEN, "clip", "model.safetensors"), fam.abstract_params())
  with pytest.raises(ValueError, match=r"at most 16 tokens, got 20"):
    fam.apply(params, {"text": np.zeros((1, 20), np.int32)})


def test_variants_have_the_published_sizes():
  """CLIP B/32 at 224: as many parameters as transformers' CLIPModel with its default
  (ViT-B/32) config."""
  n = sum(int(np.prod(s)) for s in clip.family({"variant": "B/32"}).param_shapes().values())
  assert n == 151_277_313
