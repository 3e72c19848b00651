"""mmjax.pretrained.bert equals Hugging Face's BertForSequenceClassification on the golden
files (tests/golden/make_golden.py: random weights; sentence pairs of 16, 11 and 5
tokens with segment ids, padded to 16): every block's tokens and the logits within 1e-5
relative in float32; a checkpoint without a classifier starts the head at zero;
TensorFlow-converted LayerNorm names (gamma, beta) load too."""
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmjax.compress import flatten
from mmjax.pretrained import bert, checkpoint_files

import golden_files
from golden_files import rel as _rel

_args = lambda **over: golden_files.args("bert", **over)
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "bert")


def _batch(io):
  return {"text": io["input_ids"].astype(np.int32), "text_mask": io["attention_mask"] > 0,
          "token_types": io["token_type_ids"].astype(np.int32)}


def test_bert_equals_the_hugging_face_reference():
  fam = bert.family(_args())
  params = fam.load(os.path.join(GOLDEN, "model.safetensors"), fam.abstract_params())
  io = np.load(os.path.join(GOLDEN, "io.npz"))
  logits, inter = jax.jit(fam.apply)(params, _batch(io))
  for i in range(fam.args["depth"]):
    assert _rel(inter[f"block_{i:02d}"], io["hidden_states"][i + 1]) < 1e-5, i
  assert _rel(logits, io["logits"]) < 1e-5


def test_pretraining_names_and_a_new_head(tmp_path):
  """Without `bert.` and the classifier, with gamma/beta LayerNorms and a pretraining
  head (`cls.*`, left aside): the encoder loads the same, the new head is zero."""
  tensors = load_file(os.path.join(GOLDEN, "model.safetensors"))
  renamed = {}
  for k, v in tensors.items():
    if k.startswith("classifier."):
      continue
    k = k[len("bert."):].replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta")
    renamed[k] = v
  renamed["cls.predictions.bias"] = np.zeros(99, np.float32)
  path = str(tmp_path / "model.safetensors")
  save_file(renamed, path)
  fam = bert.family(_args())
  params = fam.load(path, fam.abstract_params())
  reference = fam.load(os.path.join(GOLDEN, "model.safetensors"), fam.abstract_params())
  flat, ref = flatten(params), flatten(reference)
  assert not flat["head/kernel"].any() and not flat["head/bias"].any()
  assert all(np.array_equal(flat[p], ref[p]) for p in flat if not p.startswith("head/"))


def test_bad_inputs_are_one_line():
  fam = bert.family(_args(depth=3))
  with pytest.raises(checkpoint_files.CheckpointError, match=r"BERT checkpoint .*: .*16 "
                     r"missing \(bert.encoder.layer.2"):
    fam.load(os.path.join(GOLDEN, "model.safetensors"), fam.abstract_params())
  fam = bert.family(_args())
  params = fam.load(os.path.join(GOLDEN, "model.safetensors"), fam.abstract_params())
  with pytest.raises(ValueError, match=r"at most 16 tokens, got 20"):
    fam.apply(params, {"text": np.zeros((1, 20), np.int32)})
  with pytest.raises(ValueError, match=r"variant='xl' is unknown; valid: tiny, mini"):
    bert.family({"variant": "xl"})


def test_variants_have_the_published_sizes():
  """BERT base with a 2-class head: as many parameters as transformers'
  BertForSequenceClassification with its default config."""
  n = sum(int(np.prod(s)) for s in bert.family({"variant": "base"}).param_shapes().values())
  assert n == 109_483_778
