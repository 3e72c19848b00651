"""The pretrained families' inputs against their references: images resized and normalized
as the Hugging Face image processors do, text tokenized as the reference tokenizers do
(from the checkpoint's own tokenizer.json or SentencePiece model), both golden files of
tests/golden/make_golden.py; zero-shot logits against float64 NumPy; TFDS features read
into modalities; and the bad inputs, each one line before any work."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import adapters
from mmjax.pretrained import clip, hf_config, image_processing, siglip, text_tokenizer

from golden_files import unit as _norm

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.mark.parametrize("name", ["vit", "clip", "siglip"])
def test_images_equal_the_reference_image_processors(name):
  """Up- and down-sizing, square and not: PIL's filter and the target size's rounding as
  the reference, so the pixels agree exactly (float32)."""
  d = np.load(os.path.join(GOLDEN, name, "preprocess.npz"))
  from_files = image_processing.spec(name, 32, os.path.join(GOLDEN, name))
  assert from_files == image_processing.spec(name, 32)  # the defaults are the reference's
  for i in range(4):
    got = image_processing.apply(d[f"image_{i}"], from_files)
    np.testing.assert_allclose(got, d[f"pixels_{i}"], rtol=0, atol=1e-6)
  gray = d["image_0"][..., :1]  # one channel: repeated to three (do_convert_rgb)
  np.testing.assert_array_equal(image_processing.apply(gray, from_files),
                                image_processing.apply(np.repeat(gray, 3, -1), from_files))


@pytest.mark.parametrize("name,kind", [("clip", "HFTokenizer"), ("bert", "HFTokenizer"),
                                       ("siglip", "SentencePieceTokenizer")])
def test_text_equals_the_reference_tokenizers(name, kind):
  """Byte-level BPE (CLIP: start and end tokens, padded with the end token), WordPiece
  (BERT: [CLS] [SEP], lowercased), SentencePiece (SigLIP: punctuation dropped,
  lowercased, the end token appended): ids and masks, truncated and padded to 16."""
  d = np.load(os.path.join(GOLDEN, name, "preprocess.npz"))
  with open(os.path.join(GOLDEN, name, "texts.json")) as f:
    texts = json.load(f)
  tok = text_tokenizer.load(os.path.join(GOLDEN, name))
  assert type(tok).__name__ == kind
  ids, mask = tok.encode(texts, 16)
  np.testing.assert_array_equal(ids, d["input_ids"])
  np.testing.assert_array_equal(mask, d["attention_mask"].astype(bool))


@pytest.mark.parametrize("module", [clip, siglip])
def test_zero_shot_logits_against_numpy(module):
  """Class-name prompts through the text tower inside the forward: each class's templates
  normalized and averaged, renormalized, scaled (and SigLIP's bias added), against the
  same towers' embeddings combined in float64."""
  name = module.__name__.rsplit(".", 1)[1]
  folder = os.path.join(GOLDEN, name)
  names, templates = ["cat", "dog", "red car"], ["a photo of a {}.", "the {}!"]
  a = dict(hf_config.model_args(name, folder), tokenizer=folder)
  zs = module.family(dict(a, class_names=names, templates=templates))
  plain = module.family(a)
  assert zs.modalities == ("image",) and zs.labels == tuple(names)
  params = zs.load(os.path.join(folder, "model.safetensors"), zs.abstract_params())
  batch = zs.example_batch(4, with_labels=False)
  logits, _ = jax.jit(zs.apply)(params, batch)

  tok = text_tokenizer.load(folder)
  n = 16 if name == "siglip" else None
  ids, mask = tok.encode([t.format(c) for c in names for t in templates], 16)
  if n is None:  # CLIP runs the prompts at the longest one's length; any length pools alike
    ids, mask = ids[:, :int(mask.sum(1).max())], mask[:, :int(mask.sum(1).max())]
  else:
    mask = np.ones_like(mask)
  out, _ = plain.apply(params, {"image": batch["image"], "text": ids, "text_mask": mask})
  cls = _norm(_norm(out["text"]).reshape(3, 2, -1).mean(1))
  want = np.exp(np.float64(params["logit_scale"])) * _norm(out["image"]) @ cls.T
  if name == "siglip":
    want = want + np.float64(params["logit_bias"])
  np.testing.assert_allclose(np.asarray(logits, np.float64), want, rtol=1e-5, atol=1e-5)


def test_tfds_features_are_read_into_modalities():
  """Any TFDS dataset by name: Image, Audio, Text features and the ClassLabel by type; two
  features of one kind name themselves when a model asks for that kind."""
  info = lambda name: tfds.builder(name).info.features
  a = adapters.get_adapter("food101", None, info("food101"))
  assert a.modalities == {"image": "image"} and a.label == "label"
  a = adapters.get_adapter("ag_news_subset", None, info("ag_news_subset"))
  assert "text" not in a.modalities
  assert sorted(dict(a.ambiguous)["text"]) == ["description", "title"]
  a = adapters.get_adapter("ag_news_subset", (("label", "label"), ("text", "title")))
  assert a.modalities == {"text": "title"} and a.label == "label"
  from mmjax.data import pipeline
  with pytest.raises(ValueError, match=r"ag_news_subset has several text features .* pick one "
                     r"with config.data.features=\{'text': "):
    pipeline._prep_fn(pipeline.InputConfig(dataset="ag_news_subset", modalities=("text",)))


def test_config_json_as_the_hub_writes_it(tmp_path):
  """The Hub's config.json files leave out what equals transformers' defaults (SigLIP's
  name no size at all): those defaults are transformers' own (golden), a bare SigLIP
  config gives B/16's 203,155,970 parameters, SigLIP 2's adds its 256k vocabulary, and
  OpenAI's legacy CLIP configs (end token id 2) pool at the largest id, as transformers."""
  with open(os.path.join(GOLDEN, "hf_config_defaults.json")) as f:
    golden = json.load(f)
  golden.pop("transformers")
  assert hf_config.DEFAULTS == golden

  def args(family, config):
    d = tmp_path / family
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return hf_config.model_args(family, str(d))

  count = lambda fam: sum(x.size for x in jax.tree.leaves(fam.abstract_params()))
  bare = {"model_type": "siglip", "text_config": {"model_type": "siglip_text_model"},
          "vision_config": {"model_type": "siglip_vision_model"}}
  assert count(siglip.family(args("siglip", bare))) == 203_155_970
  two = dict(bare, text_config={"vocab_size": 256000}, vision_config={"image_size": 512})
  a = args("siglip", two)
  assert (a["vocab_size"], a["image_size"], a["image"]["width"]) == (256000, 512, 768)
  legacy = {"model_type": "clip", "text_config": {"eos_token_id": 2, "hidden_act": "quick_gelu"},
            "vision_config": {"patch_size": 32}}
  a = args("clip", legacy)
  assert a["eos_token_id"] is None and a["activation"] == "quick_gelu" and a["patch"] == 32
  assert count(clip.family(a)) == 151_277_313  # CLIP B/32
  with pytest.raises(ValueError, match=r"hidden_act=.relu2. is not one mmjax builds"):
    args("bert", {"model_type": "bert", "hidden_act": "relu2"})


# ------------------------------------------------------------------ bad input

def _config(arg, **data):
  from experiments.configs import pretrained
  c = pretrained.get_config(arg)
  c.data.update(dict(data_dir="/nonexistent-mmjax-data", **data))
  return c


def _fails_before_work(config, message, tmp_path):
  from mmjax.harness import train
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(config, workdir, log=lambda *_: None)
  assert not os.path.exists(workdir)


def test_bad_pretrained_inputs_fail_in_one_line_before_any_work(tmp_path):
  clip_dir = os.path.join(GOLDEN, "clip")
  # a checkpoint of another family (its config.json says so, and which model= reads it)
  from experiments.configs import pretrained
  with pytest.raises(ValueError, match="is a 'clip' model .*not vit; use model=clip"):
    pretrained.get_config(f"model=vit,checkpoint={clip_dir}")
  # or of another size than named
  with pytest.raises(ValueError, match=r"is not clip B/32: .*differs in .*'dim'"):
    pretrained.get_config(f"model=clip_b32,checkpoint={clip_dir}")
  # a class-name list whose length differs from the dataset's classes
  classes = tmp_path / "classes.txt"
  classes.write_text("cat\ndog\nbird\n")
  _fails_before_work(_config(f"model=clip,checkpoint={clip_dir},classes={classes}"),
                     r"the model has 3 classes but cifar10's 'label' has 10; configure the "
                     r"model for 10 \(a head's size, or as many zero-shot class names", tmp_path)
  # a dataset that lacks a modality the model needs (retrieval: image and text)
  _fails_before_work(_config(f"model=clip,checkpoint={clip_dir},task=retrieval"),
                     r"the model needs modality 'text', which cifar10 does not provide",
                     tmp_path)
  # a missing tokenizer file, and the tokenizer of another model
  missing = _config(f"model=clip,checkpoint={clip_dir}")
  missing.model.tokenizer = str(tmp_path)
  _fails_before_work(missing, r"no tokenizer file at .*: expected tokenizer.json or "
                     r"spiece.model", tmp_path)
  other = _config(f"model=siglip,checkpoint={os.path.join(GOLDEN, 'siglip')},"
                  f"tokenizer={clip_dir}")
  _fails_before_work(other, r"has 527 tokens but the model's vocabulary has 51", tmp_path)
  # audio longer than the encoder's positions
  whisper = _config(f"model=whisper,checkpoint={os.path.join(GOLDEN, 'whisper')},"
                    "dataset=mm_arith/procedural")
  _fails_before_work(whisper, r"audio_samples=16000 gives 50 positions, more than the 8 .* "
                     r"use at most 2559 samples", tmp_path)
  # a checkpoint that is not on disk, and a download without a network (or of no such
  # repository): mmjax never downloads implicitly, and the explicit command fails at once
  with pytest.raises(ValueError, match=r"no such file or directory. mmjax never downloads "
                     r"implicitly; get one with python -m mmjax.pretrained.fetch"):
    pretrained.get_config(f"model=clip,checkpoint={tmp_path / 'nothing'}")
  from mmjax.pretrained import fetch
  assert fetch.main(["--repo=mmjax-tests/no-such-repo", f"--out={tmp_path / 'dl'}"]) == 2
  with pytest.raises(ValueError, match=r"cannot download mmjax-tests/no-such-repo \("):
    fetch.fetch("mmjax-tests/no-such-repo", str(tmp_path / "dl"))
  # a linear probe of nothing
  probe = _config(f"model=vit,checkpoint={os.path.join(GOLDEN, 'vit')},task=probe")
  probe.optimizer.trainable = "classifier/.*"
  _fails_before_work(probe, r"trainable='classifier/.\*' matches no parameter", tmp_path)
