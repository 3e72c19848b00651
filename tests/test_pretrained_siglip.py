"""mmjax.pretrained.siglip equals Hugging Face's SiglipModel on the golden files
(tests/golden/make_golden.py: random weights): image and text embeddings (after the
attention-pooling and text heads), every image block, the text tower's final tokens and
the logits (scale and bias) within 1e-5 relative in float32; and mmjax.tasks.retrieval's
sigmoid loss is SigLIP's on its outputs."""
import os

import jax
import numpy as np
import pytest

from mmjax.pretrained import checkpoint_files, siglip
from mmjax.tasks import retrieval

import golden_files
from golden_files import rel as _rel, unit as _unit

_args = lambda **over: golden_files.args("siglip", **over)
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def test_siglip_equals_the_hugging_face_reference():
  fam = siglip.family(_args())
  params = fam.load(os.path.join(GOLDEN, "siglip", "model.safetensors"),
                    fam.abstract_params())
  io = np.load(os.path.join(GOLDEN, "siglip", "io.npz"))
  batch = {"image": io["pixel_values"].transpose(0, 2, 3, 1),
           "text": io["input_ids"].astype(np.int32)}
  out, inter = jax.jit(fam.apply)(params, batch)
  assert _rel(_unit(out["image"]), io["image_embeds"]) < 1e-5
  assert _rel(_unit(out["text"]), io["text_embeds"]) < 1e-5
  for i in range(fam.args["image"]["depth"]):
    assert _rel(inter[f"image/block_{i:02d}"], io["vision_blocks"][i]) < 1e-5
  assert _rel(inter["text/final"], io["text_hidden"]) < 1e-5
  scale, bias = np.exp(float(out["logit_scale"])), float(out["logit_bias"])
  assert _rel(scale * _unit(out["image"]) @ _unit(out["text"]).T + bias,
              io["logits_per_image"]) < 1e-5

  # SigLIP's loss: -log sigmoid(±logit) over every pair, summed, per example
  loss, _ = retrieval.task({"loss": "sigmoid"}, fam).loss(out, {"example_mask": np.ones(3, bool)})
  z = np.asarray(io["logits_per_image"], np.float64)
  y = 2 * np.eye(3) - 1
  assert float(loss) == pytest.approx(np.log1p(np.exp(-y * z)).sum() / 3, rel=1e-5)


def test_a_checkpoint_of_another_family_names_its_keys():
  fam = siglip.family(_args())
  with pytest.raises(checkpoint_files.CheckpointError, match=r"SigLIP checkpoint .*clip/model"
                     r".safetensors: .*missing \(logit_bias, text_model.head.bias"):
    fam.load(os.path.join(GOLDEN, "clip", "model.safetensors"), fam.abstract_params())
  with pytest.raises(ValueError, match=r"variant='So400m/x' is unknown; valid: B/16, L/16, "
                     "So400m/14"):
    siglip.family({"variant": "So400m/x"})


def test_variants_have_the_published_sizes():
  """SigLIP B/16 at 224 with its 32k vocabulary and 64 tokens: as many parameters as
  transformers' SiglipModel has with its default (B/16) config."""
  n = sum(int(np.prod(s)) for s in siglip.family({"variant": "B/16"}).param_shapes().values())
  assert n == 203_155_970
