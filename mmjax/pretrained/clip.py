"""CLIP (Radford et al. 2021) in the layout of Hugging Face's `CLIPModel`: an image tower
(a bias-free conv patch stem, a class embedding, position embeddings, a LayerNorm before
the blocks, the class token normalized after them) and a causal text tower (token and
position embeddings, the token at the end-of-text position pooled), each projected
without bias to a shared space, and a learned `logit_scale`. A model module
(`config.model_module = "mmjax.pretrained.clip"`) for `mmjax.tasks.retrieval`:

    config.model = dict(variant="B/32")            # B/32, B/16, L/14 (OpenAI's sizes)
    config.init = "/path/to/model.safetensors"     # a Hugging Face CLIPModel checkpoint

Inputs: `image` `[batch, size, size, 3]` (resized, normalized), `text` `[batch, len]`
token ids with `text_mask` (True for real tokens). Outputs `{"image": [batch, dim],
"text": [batch, dim], "logit_scale": ()}` (embeddings before their L2 normalization,
which the task does) and each tower's blocks as intermediates (`image/block_00`, ...).
With `tokenizer` the pipeline tokenizes text with the checkpoint's own; with
`class_names` it is a zero-shot classifier: images in, logits over the classes' prompts
out (the text tower runs on the prompts inside the forward, so compression of it counts);
see mmjax/pretrained/inputs.py.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.harness.family import Family
from mmjax.pretrained import checkpoint_files, inputs, model_args, two_towers
from mmjax.pretrained.checkpoint_files import Tensor
from mmjax.pretrained.encoder import Tower, check_activation, pooled_at

# image (width, depth, heads, mlp), text (width, depth, heads, mlp), projection dim
SIZES = {"B": ((768, 12, 12, 3072), (512, 12, 8, 2048), 512),
         "L": ((1024, 24, 16, 4096), (768, 12, 12, 3072), 768)}
TOWER = model_args.TOWER
ARGS = {"variant": "B/32", "image": None, "text": None, "patch": None, "dim": None,
        "image_size": 224, "vocab_size": 49408, "max_len": 77, "eos_token_id": 49407,
        "eps": 1e-5, "activation": "quick_gelu", "attention_impl": None,
        **inputs.ARGS, **inputs.ZERO_SHOT_ARGS}
MATMULS = r"(image|text)/block_\d+/(attn/(query|key|value|out)|mlp/(fc1|fc2))/kernel"


def resolve(args: dict) -> dict:
  a = model_args.merge(args, ARGS, "mmjax.pretrained.clip")
  if a["variant"]:
    (image, text, dim), patch = model_args.variant(a["variant"], SIZES, "B/32, B/16, L/14",
                                                   patched=True)
    model_args.fill(a, dict(image=dict(zip(TOWER, image)), text=dict(zip(TOWER, text)),
                            patch=patch, dim=dim))
  for tower in ("image", "text"):
    model_args.check_tower(a[tower], f"config.model.{tower}")
  model_args.require(a, ("patch", "dim"), "B/32")
  model_args.check_patch(a)
  check_activation(a["activation"], "config.model.activation")
  return a


class Clip(nn.Module):
  cfg: dict

  def block(self, tower, causal=False):
    t = self.cfg[tower]
    return dict(num_heads=t["heads"], mlp_dim=t["mlp_dim"], eps=self.cfg["eps"],
                activation=self.cfg["activation"], causal=causal,
                implementation=self.cfg["attention_impl"])

  @nn.compact
  def __call__(self, batch, rng=None, prompts=None):
    """prompts: (ids, mask) of the zero-shot prompts: then logits [batch, classes]."""
    return two_towers.call(self, batch, prompts, scale_init=1 / 0.07)

  def image_tower(self, image, inter):
    c = self.cfg
    w, s = c["image"]["width"], c["image_size"]
    if image.shape[1:] != (s, s, 3):
      raise ValueError(f"CLIP expects images [batch, {s}, {s}, 3], got {tuple(image.shape)}; "
                       "resize them first.")
    x = nn.Conv(w, (c["patch"],) * 2, strides=c["patch"], padding="VALID", use_bias=False,
                name="image_stem")(image)
    x = x.reshape(x.shape[0], -1, w)
    cls = self.param("image_cls", nn.initializers.normal(0.02), (w,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, w)), x], axis=1)
    x = x + self.param("image_pos_embedding", nn.initializers.normal(0.02), x.shape[1:])
    x = nn.LayerNorm(c["eps"], name="image_ln_pre")(x)
    x = Tower(self.block("image"), c["image"]["depth"], name="image")(x, inter)
    pooled = inter["image/pooled"] = nn.LayerNorm(c["eps"], name="image_ln_post")(x[:, 0])
    return nn.Dense(c["dim"], use_bias=False, name="image_proj")(pooled)

  def text_tower(self, ids, mask, inter):
    c = self.cfg
    if ids.shape[1] > c["max_len"]:
      raise ValueError(f"CLIP's text tower takes at most {c['max_len']} tokens, got "
                       f"{ids.shape[1]}.")
    w = c["text"]["width"]
    x = nn.Embed(c["vocab_size"], w, name="text_embed")(ids)
    x = x + self.param("text_pos_embedding", nn.initializers.normal(0.01),
                       (c["max_len"], w))[:ids.shape[1]]
    x = Tower(self.block("text", causal=True), c["text"]["depth"], name="text")(
        x, inter, mask)
    x = inter["text/final"] = nn.LayerNorm(c["eps"], name="text_norm")(x)
    eos = (jnp.argmax(ids, -1) if c["eos_token_id"] is None
           else jnp.argmax(ids == c["eos_token_id"], -1))
    pooled = inter["text/pooled"] = pooled_at(x, eos)
    return nn.Dense(c["dim"], use_bias=False, name="text_proj")(pooled)


# ------------------------------------------------------------------ Hugging Face names

def _linear(w):
  return np.ascontiguousarray(w.T)


def _blocks(src: str, dst: str, depth: int) -> list:
  parts = {"self_attn.q_proj": "attn/query", "self_attn.k_proj": "attn/key",
           "self_attn.v_proj": "attn/value", "self_attn.out_proj": "attn/out",
           "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
  norms = {"layer_norm1": "ln_attn", "layer_norm2": "ln_mlp"}
  spec = []
  for i in range(depth):
    s, d = f"{src}.encoder.layers.{i}.", f"{dst}/block_{i:02d}/"
    for k, v in parts.items():
      spec += [Tensor(f"{s}{k}.weight", f"{d}{v}/kernel", _linear),
               Tensor(f"{s}{k}.bias", f"{d}{v}/bias")]
    for k, v in norms.items():
      spec += [Tensor(f"{s}{k}.weight", f"{d}{v}/scale"), Tensor(f"{s}{k}.bias", f"{d}{v}/bias")]
  return spec


def hf_spec(a: dict) -> list:
  v, t = "vision_model", "text_model"
  ln = lambda src, dst: [Tensor(f"{src}.weight", f"{dst}/scale"),
                         Tensor(f"{src}.bias", f"{dst}/bias")]
  return ([Tensor(f"{v}.embeddings.patch_embedding.weight", "image_stem/kernel",
                  lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))),
           Tensor(f"{v}.embeddings.class_embedding", "image_cls"),
           Tensor(f"{v}.embeddings.position_embedding.weight", "image_pos_embedding")]
          + ln(f"{v}.pre_layrnorm", "image_ln_pre") + ln(f"{v}.post_layernorm", "image_ln_post")
          + _blocks(v, "image", a["image"]["depth"])
          + [Tensor("visual_projection.weight", "image_proj/kernel", _linear),
             Tensor(f"{t}.embeddings.token_embedding.weight", "text_embed/embedding"),
             Tensor(f"{t}.embeddings.position_embedding.weight", "text_pos_embedding")]
          + ln(f"{t}.final_layer_norm", "text_norm") + _blocks(t, "text", a["text"]["depth"])
          + [Tensor("text_projection.weight", "text_proj/kernel", _linear),
             Tensor("logit_scale", "logit_scale")])


def load(path: str, abstract, args: dict):
  """A Hugging Face `CLIPModel` safetensors checkpoint -> params shaped like `abstract`."""
  checkpoint_files.check_format(path, "mmjax.pretrained.clip")
  return checkpoint_files.to_params(checkpoint_files.read_safetensors(path), hf_spec(args),
                                    abstract, f"CLIP checkpoint {path}",
                                    ignore=(r".*position_ids",))


def family(args: dict) -> Family:
  a = resolve(args)

  def text_example(rng, batch_size, n):
    text = rng.integers(0, a["vocab_size"], (batch_size, n)).astype(np.int32)
    if a["eos_token_id"] is not None:
      text[:, -1] = a["eos_token_id"]
    return {"text": text, "text_mask": np.ones((batch_size, n), bool)}

  return two_towers.family("clip", Clip, a, fixed_len=False, text_example=text_example,
                           load=load, matmuls=MATMULS,
                           unit_types={"image": r"image/.*kernel", "text": r"text/.*kernel"})
