"""BERT's encoder (Devlin et al. 2019) in the layout of Hugging Face's `BertModel` /
`BertForSequenceClassification`: word, position and segment embeddings summed and
normalized, post-LN blocks, a tanh pooler on the first ([CLS]) token and an optional
linear classifier on it. A model module (`config.model_module = "mmjax.pretrained.bert"`):

    config.model = dict(variant="base", num_classes=2)   # tiny mini small medium base large
    config.init = "/path/to/model.safetensors"

Inputs: `text` `[batch, len]` token ids, `text_mask` (True for real tokens), optional
`token_types` (segment ids, 0 when absent). `apply` returns (logits, or with
`num_classes=0` the pooled features; intermediates: each block, the final tokens).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.harness.family import Family
from mmjax.pretrained import checkpoint_files, inputs, model_args
from mmjax.pretrained.checkpoint_files import Tensor
from mmjax.pretrained.clip import _linear
from mmjax.pretrained.encoder import encode

SIZES = {"tiny": (128, 2, 2, 512), "mini": (256, 4, 4, 1024), "small": (512, 4, 8, 2048),
         "medium": (512, 8, 8, 2048), "base": (768, 12, 12, 3072),
         "large": (1024, 24, 16, 4096)}
ARGS = {"variant": "base", "width": None, "depth": None, "heads": None, "mlp_dim": None,
        "vocab_size": 30522, "max_len": 512, "type_vocab_size": 2, "num_classes": 2,
        "eps": 1e-12, "attention_impl": None, "tokenizer": None,
        "new_head": False}
MATMULS = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc1|fc2))/kernel"


def resolve(args: dict) -> dict:
  a = model_args.merge(args, ARGS, "mmjax.pretrained.bert")
  if a["variant"]:
    sizes, _ = model_args.variant(a["variant"], SIZES, ", ".join(SIZES), patched=False)
    model_args.fill(a, dict(zip(model_args.TOWER, sizes)))
  model_args.require(a, model_args.TOWER, "base")
  model_args.check_tower({k: a[k] for k in model_args.TOWER}, "config.model")
  return a


class Bert(nn.Module):
  cfg: dict

  @nn.compact
  def __call__(self, batch, rng=None):
    c = self.cfg
    ids = batch["text"]
    if ids.shape[1] > c["max_len"]:
      raise ValueError(f"BERT takes at most {c['max_len']} tokens, got {ids.shape[1]}.")
    types = batch.get("token_types")
    types = jnp.zeros_like(ids) if types is None else types
    x = (nn.Embed(c["vocab_size"], c["width"], name="embed")(ids)
         + self.param("pos_embedding", nn.initializers.normal(0.02),
                      (c["max_len"], c["width"]))[:ids.shape[1]]
         + nn.Embed(c["type_vocab_size"], c["width"], name="type_embed")(types))
    x = nn.LayerNorm(c["eps"], name="embed_norm")(x)
    inter = {}
    x = inter["final"] = encode(x, batch.get("text_mask"), c["depth"], dict(
        num_heads=c["heads"], mlp_dim=c["mlp_dim"], eps=c["eps"], post_ln=True,
        implementation=c["attention_impl"]), inter)
    pooled = inter["pooled"] = jnp.tanh(nn.Dense(c["width"], name="pooler")(x[:, 0]))
    if not c["num_classes"]:
      return pooled, inter
    return nn.Dense(c["num_classes"], name="head")(pooled), inter


# ------------------------------------------------------------------ Hugging Face names

def hf_spec(a: dict, prefix: str, gamma: bool) -> list:
  """`gamma`: the LayerNorm names of checkpoints converted from TensorFlow (gamma, beta)."""
  w, b = ("gamma", "beta") if gamma else ("weight", "bias")
  ln = lambda src, dst: [Tensor(f"{src}.{w}", f"{dst}/scale"), Tensor(f"{src}.{b}", f"{dst}/bias")]
  lin = lambda src, dst: [Tensor(f"{src}.weight", f"{dst}/kernel", _linear),
                          Tensor(f"{src}.bias", f"{dst}/bias")]
  e = f"{prefix}embeddings."
  spec = ([Tensor(f"{e}word_embeddings.weight", "embed/embedding"),
           Tensor(f"{e}position_embeddings.weight", "pos_embedding"),
           Tensor(f"{e}token_type_embeddings.weight", "type_embed/embedding")]
          + ln(f"{e}LayerNorm", "embed_norm") + lin(f"{prefix}pooler.dense", "pooler"))
  parts = {"attention.self.query": "attn/query", "attention.self.key": "attn/key",
           "attention.self.value": "attn/value", "attention.output.dense": "attn/out",
           "intermediate.dense": "mlp/fc1", "output.dense": "mlp/fc2"}
  for i in range(a["depth"]):
    s, d = f"{prefix}encoder.layer.{i}.", f"block_{i:02d}/"
    for k, v in parts.items():
      spec += lin(f"{s}{k}", f"{d}{v}")
    spec += ln(f"{s}attention.output.LayerNorm", f"{d}ln_attn") + ln(f"{s}output.LayerNorm",
                                                                     f"{d}ln_mlp")
  if a["num_classes"]:
    spec += lin("classifier", "head")
  return spec


def load(path: str, abstract, args: dict):
  """A Hugging Face BERT checkpoint (`BertModel`, `BertForSequenceClassification`, or a
  pretraining checkpoint, whose heads are left aside) -> params shaped like `abstract`."""
  checkpoint_files.check_format(path, "mmjax.pretrained.bert")
  tensors = checkpoint_files.read_safetensors(path)
  prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
  gamma = any(k.endswith("LayerNorm.gamma") for k in tensors)
  fresh = checkpoint_files.fresh_head(args, "classifier.weight" in tensors)
  spec = hf_spec({**args, "num_classes": 0} if fresh else args, prefix, gamma)
  return checkpoint_files.to_params(tensors, spec, abstract, f"BERT checkpoint {path}",
                                    new=("head/",) if fresh else (),
                                    ignore=(r"cls\..*", r".*position_ids")
                                    + ((r"classifier\..*",) if fresh else ()))


def family(args: dict) -> Family:
  a = resolve(args)
  tok = inputs.tokenizer(a, a["vocab_size"])
  model = Bert(a)

  def example_batch(batch_size, data=None, seed=0, with_labels=True):
    rng = np.random.default_rng(seed)
    n = min(a["max_len"], data.text_len if data is not None else 16)
    out = {"text": rng.integers(0, a["vocab_size"], (batch_size, n)).astype(np.int32),
           "text_mask": np.ones((batch_size, n), bool)}
    if with_labels and a["num_classes"]:
      out["label"] = rng.integers(0, a["num_classes"], batch_size).astype(np.int32)
    return out

  return Family(
      "mmjax.pretrained.bert", init=lambda rng, batch: model.init(rng, batch)["params"],
      apply=lambda params, batch, rng=None: model.apply({"params": params}, batch),
      example_batch=example_batch, modalities=("text",),
      patterns={"matmul": MATMULS, "weights": r".*(kernel|embedding)", "activations": MATMULS},
      labels=tuple(str(i) for i in range(a["num_classes"])) or None,
      load=lambda path, abstract: load(path, abstract, a),
      unit_types={"attention": r".*/attn/\w+/kernel", "mlp": r".*/mlp/\w+/kernel"},
      preprocess=inputs.preprocess(None, a, ("text",), tok) if tok else None, args=a)
