"""SigLIP (Zhai et al. 2023) in the layout of Hugging Face's `SiglipModel`: an image tower
(a conv patch stem with bias, position embeddings and no class token, pre-LN blocks, a
final LayerNorm, and multi-head attention pooling: a learned probe attends to the tokens,
then a residual MLP) and a text tower (no causal mask, the last position pooled, then a
linear head), with a learned `logit_scale` and `logit_bias` for the sigmoid loss. A
model module (`config.model_module = "mmjax.pretrained.siglip"`) for
`mmjax.tasks.retrieval` with `loss="sigmoid"`:

    config.model = dict(variant="B/16")          # B/16, L/16, So400m/14
    config.init = "/path/to/model.safetensors"   # a Hugging Face SiglipModel checkpoint,
                                                 # or big_vision's .npz (two_towers)

Inputs: `image` `[batch, size, size, 3]` (resized, normalized), `text` `[batch, len]`
(SigLIP pads to a fixed length; `text_mask`, when given, masks keys as the reference's
`attention_mask` does). Outputs `{"image", "text", "logit_scale", "logit_bias"}`.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.harness.family import Family
from mmjax.kernels.attention import dot_product_attention
from mmjax.pretrained import checkpoint_files, inputs, model_args, two_towers
from mmjax.pretrained.checkpoint_files import Tensor
from mmjax.pretrained.clip import _blocks, _linear
from mmjax.pretrained.encoder import Mlp, Tower, check_activation

SIZES = {"B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096), "So400m": (1152, 27, 16, 4304)}
TOWER = model_args.TOWER
ARGS = {"variant": "B/16", "image": None, "text": None, "patch": None, "image_size": 224,
        "vocab_size": 32000, "max_len": 64, "eps": 1e-6, "activation": "gelu_tanh",
        "attention_impl": None, **inputs.ARGS, **inputs.ZERO_SHOT_ARGS}
MATMULS = (r"(image|text)/block_\d+/(attn/(query|key|value|out)|mlp/(fc1|fc2))/kernel"
           r"|image_head/(attn/(query|key|value|out)|mlp/(fc1|fc2))/kernel|text_head/kernel")


def resolve(args: dict) -> dict:
  a = model_args.merge(args, ARGS, "mmjax.pretrained.siglip")
  if a["variant"]:
    sizes, patch = model_args.variant(a["variant"], SIZES, "B/16, L/16, So400m/14",
                                      patched=True)
    model_args.fill(a, dict(image=dict(zip(TOWER, sizes)), text=dict(zip(TOWER, sizes)),
                            patch=patch))
  for tower in ("image", "text"):
    model_args.check_tower(a[tower], f"config.model.{tower}")
  model_args.require(a, ("patch",), "B/16")
  model_args.check_patch(a)
  check_activation(a["activation"], "config.model.activation")
  return a


class ProbeAttention(nn.Module):
  """Multi-head attention of a learned probe (the queries) over the tokens."""
  heads: int
  implementation: str | None = None

  @nn.compact
  def __call__(self, probe, x):
    b, _, d = x.shape
    split = lambda y: y.reshape(y.shape[:2] + (self.heads, d // self.heads))
    q = split(nn.Dense(d, name="query")(probe))
    k, v = (split(nn.Dense(d, name=n)(x)) for n in ("key", "value"))
    h = dot_product_attention(q, k, v, implementation=self.implementation)
    return nn.Dense(d, name="out")(h.reshape(b, 1, d))


class MapHead(nn.Module):
  """Multi-head attention pooling: a learned probe's attention over the tokens, then
  probe + mlp(ln(probe))."""
  heads: int
  mlp_dim: int
  eps: float
  activation: str
  implementation: str | None = None

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    probe = jnp.broadcast_to(self.param("probe", nn.initializers.normal(0.02), (1, 1, d)),
                             (b, 1, d))
    h = ProbeAttention(self.heads, self.implementation, name="attn")(probe, x)
    h = h + Mlp(self.mlp_dim, self.activation, name="mlp")(nn.LayerNorm(self.eps, name="ln")(h))
    return h[:, 0]


class Siglip(nn.Module):
  cfg: dict

  def block(self, tower):
    t = self.cfg[tower]
    return dict(num_heads=t["heads"], mlp_dim=t["mlp_dim"], eps=self.cfg["eps"],
                activation=self.cfg["activation"], implementation=self.cfg["attention_impl"])

  @nn.compact
  def __call__(self, batch, rng=None, prompts=None):
    """prompts: (ids, mask) of the zero-shot prompts: then logits [batch, classes]."""
    return two_towers.call(self, batch, prompts, scale_init=10.0, bias_init=-10.0)

  def image_tower(self, image, inter):
    c = self.cfg
    t, s = c["image"], c["image_size"]
    if image.shape[1:] != (s, s, 3):
      raise ValueError(f"SigLIP expects images [batch, {s}, {s}, 3], got "
                       f"{tuple(image.shape)}; resize them first.")
    x = nn.Conv(t["width"], (c["patch"],) * 2, strides=c["patch"], padding="VALID",
                name="image_stem")(image)
    x = x.reshape(x.shape[0], -1, t["width"])
    x = x + self.param("image_pos_embedding", nn.initializers.normal(0.02), x.shape[1:])
    x = Tower(self.block("image"), t["depth"], name="image")(x, inter)
    x = inter["image/final"] = nn.LayerNorm(c["eps"], name="image_norm")(x)
    return MapHead(t["heads"], t["mlp_dim"], c["eps"], c["activation"], c["attention_impl"],
                   name="image_head")(x)

  def text_tower(self, ids, mask, inter):
    c = self.cfg
    if ids.shape[1] > c["max_len"]:
      raise ValueError(f"SigLIP's text tower takes at most {c['max_len']} tokens, got "
                       f"{ids.shape[1]}.")
    w = c["text"]["width"]
    x = nn.Embed(c["vocab_size"], w, name="text_embed")(ids)
    x = x + self.param("text_pos_embedding", nn.initializers.normal(0.02),
                       (c["max_len"], w))[:ids.shape[1]]
    x = Tower(self.block("text"), c["text"]["depth"], name="text")(x, inter, mask)
    x = inter["text/final"] = nn.LayerNorm(c["eps"], name="text_norm")(x)
    return nn.Dense(w, name="text_head")(x[:, -1])  # the last position, as the reference


# ------------------------------------------------------------------ Hugging Face names

def hf_spec(a: dict) -> list:
  v, t, h = "vision_model", "text_model", "vision_model.head"
  d = a["image"]["width"]
  ln = lambda src, dst: [Tensor(f"{src}.weight", f"{dst}/scale"),
                         Tensor(f"{src}.bias", f"{dst}/bias")]
  lin = lambda src, dst: [Tensor(f"{src}.weight", f"{dst}/kernel", _linear),
                          Tensor(f"{src}.bias", f"{dst}/bias")]
  in_proj = []
  for i, name in enumerate(("query", "key", "value")):  # torch's packed [3d, d] rows: q, k, v
    in_proj += [Tensor(f"{h}.attention.in_proj_weight", f"image_head/attn/{name}/kernel",
                       lambda w, i=i: _linear(w[i * d:(i + 1) * d])),
                Tensor(f"{h}.attention.in_proj_bias", f"image_head/attn/{name}/bias",
                       lambda b, i=i: b[i * d:(i + 1) * d])]
  return ([Tensor(f"{v}.embeddings.patch_embedding.weight", "image_stem/kernel",
                  lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))),
           Tensor(f"{v}.embeddings.patch_embedding.bias", "image_stem/bias"),
           Tensor(f"{v}.embeddings.position_embedding.weight", "image_pos_embedding")]
          + ln(f"{v}.post_layernorm", "image_norm") + _blocks(v, "image", a["image"]["depth"])
          + [Tensor(f"{h}.probe", "image_head/probe")] + in_proj
          + lin(f"{h}.attention.out_proj", "image_head/attn/out")
          + ln(f"{h}.layernorm", "image_head/ln") + lin(f"{h}.mlp.fc1", "image_head/mlp/fc1")
          + lin(f"{h}.mlp.fc2", "image_head/mlp/fc2")
          + [Tensor(f"{t}.embeddings.token_embedding.weight", "text_embed/embedding"),
             Tensor(f"{t}.embeddings.position_embedding.weight", "text_pos_embedding")]
          + ln(f"{t}.final_layer_norm", "text_norm") + _blocks(t, "text", a["text"]["depth"])
          + lin(f"{t}.head", "text_head")
          + [Tensor("logit_scale", "logit_scale", lambda x: x.reshape(())),
             Tensor("logit_bias", "logit_bias", lambda x: x.reshape(()))])


def load(path: str, abstract, args: dict):
  """A Hugging Face `SiglipModel` safetensors checkpoint, or big_vision's `.npz`, -> params
  shaped like `abstract`."""
  checkpoint_files.check_format(path, "mmjax.pretrained.siglip", npz=True)
  if str(path).endswith(".npz"):
    from mmjax.pretrained import big_vision
    return big_vision.load_siglip(path, abstract, args)
  return checkpoint_files.to_params(checkpoint_files.read_safetensors(path), hf_spec(args),
                                    abstract, f"SigLIP checkpoint {path}",
                                    ignore=(r".*position_ids",))


def family(args: dict) -> Family:
  a = resolve(args)
  text_example = lambda rng, batch_size, n: {
      "text": rng.integers(0, a["vocab_size"], (batch_size, n)).astype(np.int32),
      "text_mask": np.ones((batch_size, n), bool)}
  return two_towers.family("siglip", Siglip, a, fixed_len=True, text_example=text_example,
                           load=load, matmuls=MATMULS,
                           unit_types={"image": r"image.*kernel", "text": r"text.*kernel"})
