"""big_vision's (and google-research/vision_transformer's) `.npz` checkpoints, read into
mmjax's pretrained modules. Such a file holds the flax params flattened with "/"
(`Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel`, ...).

What differs from mmjax's layout, handled here:
  * attention kernels are `[width, heads, head_dim]` (q, k, v) and `[heads, head_dim,
    width]` (out): reshaped to 2-D;
  * the position embedding is added before the class token is prepended, so the class
    token has none: mmjax's `[1, 1 + patches, width]` table gets a zero first row (old
    checkpoints whose table covers the class token are taken as they are);
  * scanned checkpoints (`nn.scan`: one `Transformer/encoderblock` with a leading depth
    axis) are split per block; pre-linen names (`MultiHeadDotProductAttention_1`,
    `LayerNorm_2`, `MlpBlock_3`, `Transformer/posembed_input`) are renamed as big_vision's
    `fix_old_checkpoints` does.
big_vision's ViT uses flax's defaults: tanh-approximate GELU and LayerNorm epsilon 1e-6
(`config.model.activation="gelu_tanh"`, `eps=1e-6`).
"""
from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from mmjax.pretrained.checkpoint_files import CheckpointError, Tensor, fresh_head, to_params

_PRE_LINEN = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
              "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}


def read_npz(path: str) -> dict:
  """{"a/b/c": np.ndarray} of a big_vision checkpoint (a leading "params/" dropped)."""
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint {path}: no such file; give the path of a big_vision "
                          ".npz file (nothing is downloaded).")
  try:
    with np.load(path, allow_pickle=False) as z:
      out = {k[len("params/"):] if k.startswith("params/") else k: np.asarray(z[k])
             for k in z.files}
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise CheckpointError(f"checkpoint {path} is not a readable .npz file ({e}); it may be "
                          "truncated: download it again.") from None
  return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
          for k, v in out.items()}


def normalize(tensors: dict) -> dict:
  """Scanned blocks split per layer, pre-linen names and positions as linen's."""
  out = {}
  for k, v in tensors.items():
    m = re.match(r"((?:img/|txt/)?)Transformer/encoderblock/(.*)", k)
    if m:  # nn.scan: [depth, ...] under one block
      for i in range(v.shape[0]):
        out[f"{m.group(1)}Transformer/encoderblock_{i}/{m.group(2)}"] = v[i]
      continue
    m = re.match(r"((?:img/|txt/)?Transformer/encoderblock_\d+/)([^/]+)(/.*)", k)
    if m:
      k = m.group(1) + _PRE_LINEN.get(m.group(2), m.group(2)) + m.group(3)
    if k in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
      k = "pos_embedding"
    out[k] = v
  return out


def _heads_in(w):   # [width, heads, head_dim] -> [width, width]
  return w.reshape(w.shape[0], -1)


def _heads_out(w):  # [heads, head_dim, width] -> [width, width]
  return w.reshape(-1, w.shape[-1])


def _attention(src: str, dst: str) -> list:
  """flax's MultiHeadDotProductAttention at `src` -> mmjax's 2-D projections at `dst`."""
  spec = []
  for name in ("query", "key", "value"):
    spec += [Tensor(f"{src}{name}/kernel", f"{dst}{name}/kernel", _heads_in),
             Tensor(f"{src}{name}/bias", f"{dst}{name}/bias", lambda b: b.reshape(-1))]
  return spec + [Tensor(f"{src}out/kernel", f"{dst}out/kernel", _heads_out),
                 Tensor(f"{src}out/bias", f"{dst}out/bias")]


def _mlp(src: str, dst: str) -> list:
  return [Tensor(f"{src}Dense_{j}/{w}", f"{dst}{name}/{w}")
          for j, name in ((0, "fc1"), (1, "fc2")) for w in ("kernel", "bias")]


def _ln(src: str, dst: str) -> list:
  return [Tensor(f"{src}/scale", f"{dst}/scale"), Tensor(f"{src}/bias", f"{dst}/bias")]


def _encoder(src: str, dst: str, depth: int) -> list:
  """big_vision's `Transformer/encoderblock_i` under `src` -> mmjax's blocks under `dst`."""
  spec = []
  for i in range(depth):
    s, d = f"{src}Transformer/encoderblock_{i}/", f"{dst}block_{i:02d}/"
    spec += (_attention(f"{s}MultiHeadDotProductAttention_0/", f"{d}attn/")
             + _ln(f"{s}LayerNorm_0", f"{d}ln_attn") + _ln(f"{s}LayerNorm_1", f"{d}ln_mlp")
             + _mlp(f"{s}MlpBlock_0/", f"{d}mlp/"))
  return spec


def vit_spec(a: dict, tensors: dict) -> list:
  n = (a["image_size"] // a["patch"]) ** 2

  def pos(p):
    if a["pool"] == "cls" and p.shape[1] == n:  # no position for the class token
      return np.concatenate([np.zeros_like(p[:, :1]), p], axis=1)
    return p

  spec = [Tensor("embedding/kernel", "stem/kernel"), Tensor("embedding/bias", "stem/bias"),
          Tensor("pos_embedding", "pos_embedding", pos),
          Tensor("Transformer/encoder_norm/scale", "norm/scale"),
          Tensor("Transformer/encoder_norm/bias", "norm/bias")]
  if a["pool"] == "cls":
    spec.append(Tensor("cls", "cls"))
  spec += _encoder("", "", a["depth"])
  if a["num_classes"]:
    spec += [Tensor("head/kernel", "head/kernel"), Tensor("head/bias", "head/bias")]
  return spec


def load_vit(path: str, abstract, args: dict):
  """A big_vision ViT `.npz` -> `mmjax.pretrained.vit` params shaped like `abstract`."""
  tensors = normalize(read_npz(path))
  if "pre_logits/kernel" in tensors:
    raise CheckpointError(f"checkpoint {path} has a pre_logits layer (rep_size), which "
                          "mmjax.pretrained.vit does not build; use a checkpoint without it.")
  if "MAPHead_0/probe" in tensors:
    raise CheckpointError(f"checkpoint {path} pools with a MAP head, which "
                          "mmjax.pretrained.vit does not build (SigLIP's image tower does).")
  fresh = fresh_head(args, "head/kernel" in tensors)
  return to_params(tensors, vit_spec({**args, "num_classes": 0} if fresh else args, tensors),
                   abstract, f"big_vision ViT checkpoint {path}",
                   new=("head/",) if fresh else (),
                   ignore=() if args["num_classes"] and not fresh else (r"head/.*",))


def siglip_spec(a: dict) -> list:
  """big_vision's SigLIP (`two_towers`: `img` a ViT pooled by a MAP head, `txt` a text
  transformer pooled at the last token with a linear head, `t` and `b`)."""
  first = lambda p: p[0]  # [1, n, d] -> [n, d]
  head = "img/MAPHead_0/"
  return ([Tensor("img/embedding/kernel", "image_stem/kernel"),
           Tensor("img/embedding/bias", "image_stem/bias"),
           Tensor("img/pos_embedding", "image_pos_embedding", first)]
          + _ln("img/Transformer/encoder_norm", "image_norm")
          + _encoder("img/", "image/", a["image"]["depth"])
          + [Tensor(f"{head}probe", "image_head/probe")]
          + _attention(f"{head}MultiHeadDotProductAttention_0/", "image_head/attn/")
          + _ln(f"{head}LayerNorm_0", "image_head/ln") + _mlp(f"{head}MlpBlock_0/",
                                                              "image_head/mlp/")
          + [Tensor("txt/Embed_0/embedding", "text_embed/embedding"),
             Tensor("txt/pos_embedding", "text_pos_embedding", first)]
          + _ln("txt/Transformer/encoder_norm", "text_norm")
          + _encoder("txt/", "text/", a["text"]["depth"])
          + [Tensor("txt/head/kernel", "text_head/kernel"), Tensor("txt/head/bias", "text_head/bias"),
             Tensor("t", "logit_scale", lambda x: x.reshape(())),
             Tensor("b", "logit_bias", lambda x: x.reshape(()))])


def load_siglip(path: str, abstract, args: dict):
  """A big_vision SigLIP `.npz` -> `mmjax.pretrained.siglip` params shaped like
  `abstract`. Its text positions cover the length it was trained at: `max_len` must be
  that length (64 for the released models)."""
  return to_params(normalize(read_npz(path)), siglip_spec(args), abstract,
                   f"big_vision SigLIP checkpoint {path}")
