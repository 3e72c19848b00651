"""What CLIP and SigLIP share as model modules: the forward over either tower (or both),
the learned logit scale (and SigLIP's bias), zero-shot classification through class-name
prompts, and the `Family` around them. The towers themselves and the checkpoint names
stay in clip.py and siglip.py."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mmjax.harness.family import Family
from mmjax.pretrained import inputs


def call(module, batch, prompts, scale_init: float, bias_init: float | None = None):
  """The body of a two-tower module's `__call__` (`module` has `image_tower`,
  `text_tower` and `cfg`). `prompts`: the zero-shot prompts' (ids, mask); then the
  output is the logits over the classes, else {"image", "text", "logit_scale"[,
  "logit_bias"]}."""
  inter, out = {}, {}
  if "image" in batch:
    out["image"] = module.image_tower(batch["image"], inter)
  if prompts is not None:
    out["text"] = module.text_tower(*prompts, inter)
  elif "text" in batch:
    out["text"] = module.text_tower(batch["text"], batch.get("text_mask"), inter)
  out["logit_scale"] = module.param("logit_scale", lambda _: jnp.log(jnp.float32(scale_init)))
  if bias_init is not None:
    out["logit_bias"] = module.param("logit_bias", lambda _: jnp.float32(bias_init))
  if prompts is None:
    return out, inter
  return inputs.zero_shot_logits(out["image"], out["text"], len(module.cfg["class_names"]),
                                 jnp.exp(out["logit_scale"]),
                                 out.get("logit_bias", 0.0)), inter


def family(kind: str, module_cls, a: dict, *, fixed_len: bool, text_example, load,
           matmuls: str, unit_types: dict) -> Family:
  """The Family of a two-tower model. `fixed_len`: the text tower pools the last position
  (SigLIP: prompts at full length, all attended, as its reference does), else it pools
  the end token (CLIP: prompts at the longest one's length, padding masked).
  `text_example(rng, batch, length)` -> {"text", "text_mask"} for `example_batch`."""
  tok = inputs.tokenizer(a, a["vocab_size"])
  inputs.check_zero_shot(a, tok)
  zero_shot = a["class_names"] is not None
  model = module_cls({**a, "class_names": tuple(a["class_names"] or ()),
                      "templates": tuple(a["templates"])})
  prompts = None
  if zero_shot:
    ids, mask = inputs.prompts(a, tok, a["max_len"])
    if fixed_len:
      mask = np.ones(ids.shape, bool)
    else:
      n = int(mask.sum(1).max())
      ids, mask = ids[:, :n], mask[:, :n]
    prompts = (ids, mask)
  modalities = ("image",) if zero_shot else ("image", "text")

  def example_batch(batch_size, data=None, seed=0, with_labels=True):
    rng = np.random.default_rng(seed)
    s = a["image_size"]
    out = {"image": rng.normal(size=(batch_size, s, s, 3)).astype(np.float32)}
    if zero_shot:
      if with_labels:
        out["label"] = rng.integers(0, len(a["class_names"]), batch_size).astype(np.int32)
      return out
    n = a["max_len"] if fixed_len else min(a["max_len"], data.text_len if data else 16)
    return {**out, **text_example(rng, batch_size, n)}

  return Family(
      f"mmjax.pretrained.{kind}",
      init=lambda rng, batch: model.init(rng, batch, None, prompts)["params"],
      apply=lambda params, batch, rng=None: model.apply({"params": params}, batch, None,
                                                        prompts),
      example_batch=example_batch, modalities=modalities,
      labels=tuple(a["class_names"]) if zero_shot else None,
      preprocess=inputs.preprocess(kind, a, modalities, tok,
                                   text_len=a["max_len"] if fixed_len else None),
      patterns={"matmul": matmuls, "weights": r".*(kernel|embedding)", "activations": matmuls},
      load=lambda path, abstract: load(path, abstract, a), unit_types=unit_types, args=a)
