"""What the pretrained families share about their inputs: the preprocessing a family
gives the pipeline (`Family.preprocess`: its image processor, the checkpoint's tokenizer),
and zero-shot classification's class-name prompts.

Each family takes the same two `config.model` fields for this:
  tokenizer   the checkpoint's tokenizer (a directory or the file, text_tokenizer.py);
              None: text stays mmjax's byte tokens (a model trained from scratch)
  processor   a directory or file whose preprocessor_config.json overrides the family's
              image defaults (image_processing.py); None: the family's defaults
and the two-tower families (CLIP, SigLIP) also
  class_names zero-shot classification: the classes' names, in label order (or
              "<dataset:label_names>": the run's dataset's, mmjax/harness/family.py); the model
              then reads only images and outputs logits over the classes
  templates   the prompts each name is put into ("a photo of a {}."); several are
              averaged (CLIP's prompt ensembling: each normalized, the mean renormalized)
"""
from __future__ import annotations

import numpy as np

from mmjax.pretrained import image_processing, text_tokenizer

ARGS = {"tokenizer": None, "processor": None}
ZERO_SHOT_ARGS = {"class_names": None, "templates": ("a photo of a {}.",)}


def tokenizer(a: dict, vocab_size: int):
  """The checkpoint's tokenizer when config.model.tokenizer names one (checked against
  the model's vocabulary: a tokenizer of another model is an error), else None."""
  if not a.get("tokenizer"):
    return None
  tok = text_tokenizer.load(a["tokenizer"])
  if tok.vocab_size > vocab_size:
    raise ValueError(f"config.model.tokenizer: {tok.path} has {tok.vocab_size} tokens but the "
                     f"model's vocabulary has {vocab_size}; give the tokenizer of this "
                     "checkpoint (or set config.model.vocab_size).")
  return tok


def preprocess(kind: str, a: dict, modalities, tok=None, text_len=None):
  """Family.preprocess: data -> {modality: fn(raw) -> inputs}. Images through the family's
  processor (kind: vit, clip, siglip; None: no image); text through `tok`, padded to
  `text_len` (fixed, SigLIP: it pools the last position, and its reference gives no mask),
  else to config.data.text_len capped at the model's max_len."""
  spec = (image_processing.spec(kind, a["image_size"], a.get("processor"))
          if kind and "image" in modalities else None)

  def make(data):
    out = {}
    if spec is not None:
      out["image"] = lambda x: {"image": image_processing.apply(x, spec)}
    if tok is not None and "text" in modalities:
      n = text_len or min(a["max_len"], data.text_len)

      def text(x):
        ids, mask = tok.encode([x], n)
        return {"text": ids[0], "text_mask": np.ones(n, bool) if text_len else mask[0]}
      out["text"] = text
    return out
  return make


def check_zero_shot(a: dict, tok) -> None:
  names, templates = a.get("class_names"), a.get("templates")
  if names is None:
    return
  if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
    raise ValueError(f"config.model.class_names={names!r} must be a non-empty list of class "
                     "names, in label order.")
  if (isinstance(templates, str) or not templates
      or not all(isinstance(t, str) and "{}" in t for t in templates)):
    raise ValueError(f"config.model.templates={templates!r} must be a list of prompts, each "
                     "with {} where the class name goes, e.g. ['a photo of a {}.'].")
  if tok is None:
    raise ValueError("config.model.class_names needs the checkpoint's tokenizer to encode the "
                     "prompts; set config.model.tokenizer to its directory or file.")


def prompts(a: dict, tok, length: int):
  """Every (class, template) prompt's ids and mask, class-major: [classes * templates, L]."""
  texts = [t.format(n.replace("_", " ")) for n in a["class_names"] for t in a["templates"]]
  return tok.encode(texts, length)


def zero_shot_logits(image, text, n_classes: int, scale, bias=0.0):
  """[batch, classes]: scale * cos(image, class embedding) + bias, the class embedding the
  renormalized mean of its templates' normalized embeddings."""
  import jax.numpy as jnp
  norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  t = norm(text.astype(jnp.float32)).reshape(n_classes, -1, text.shape[-1]).mean(1)
  return scale * (norm(image.astype(jnp.float32)) @ norm(t).T) + bias
