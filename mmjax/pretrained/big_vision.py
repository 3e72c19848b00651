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

import jax.numpy as jnp
import numpy as np

from mmjax.pretrained.checkpoint_files import CheckpointError, Tensor, assemble

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
    m = re.match(r"Transformer/encoderblock/(.*)", k)
    if m:  # nn.scan: [depth, ...] under one block
      for i in range(v.shape[0]):
        out[f"Transformer/encoderblock_{i}/{m.group(1)}"] = v[i]
      continue
    if k.startswith("Transformer/encoderblock_"):
      parts = k.split("/")
      parts[2] = _PRE_LINEN.get(parts[2], parts[2])
      k = "/".join(parts)
    if k in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
      k = "pos_embedding"
    out[k] = v
  return out


def _heads_in(w):   # [width, heads, head_dim] -> [width, width]
  return w.reshape(w.shape[0], -1)


def _heads_out(w):  # [heads, head_dim, width] -> [width, width]
  return w.reshape(-1, w.shape[-1])


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
  for i in range(a["depth"]):
    s, d = f"Transformer/encoderblock_{i}/", f"block_{i:02d}/"
    attn = f"{s}MultiHeadDotProductAttention_0/"
    for name in ("query", "key", "value"):
      spec += [Tensor(f"{attn}{name}/kernel", f"{d}attn/{name}/kernel", _heads_in),
               Tensor(f"{attn}{name}/bias", f"{d}attn/{name}/bias", lambda b: b.reshape(-1))]
    spec += [Tensor(f"{attn}out/kernel", f"{d}attn/out/kernel", _heads_out),
             Tensor(f"{attn}out/bias", f"{d}attn/out/bias")]
    for ln, dst in (("LayerNorm_0", "ln_attn"), ("LayerNorm_1", "ln_mlp")):
      spec += [Tensor(f"{s}{ln}/scale", f"{d}{dst}/scale"), Tensor(f"{s}{ln}/bias", f"{d}{dst}/bias")]
    for j, dst in ((0, "fc1"), (1, "fc2")):
      spec += [Tensor(f"{s}MlpBlock_0/Dense_{j}/kernel", f"{d}mlp/{dst}/kernel"),
               Tensor(f"{s}MlpBlock_0/Dense_{j}/bias", f"{d}mlp/{dst}/bias")]
  if a["num_classes"]:
    spec += [Tensor("head/kernel", "head/kernel"), Tensor("head/bias", "head/bias")]
  return spec


def load_vit(path: str, abstract, args: dict):
  """A big_vision ViT `.npz` -> `mmjax.pretrained.vit` params shaped like `abstract`."""
  from mmjax.compress import flatten, unflatten
  tensors = normalize(read_npz(path))
  if "pre_logits/kernel" in tensors:
    raise CheckpointError(f"checkpoint {path} has a pre_logits layer (rep_size), which "
                          "mmjax.pretrained.vit does not build; use a checkpoint without it.")
  if "MAPHead_0/probe" in tensors:
    raise CheckpointError(f"checkpoint {path} pools with a MAP head, which "
                          "mmjax.pretrained.vit does not build (SigLIP's image tower does).")
  flat = assemble(tensors, vit_spec(args, tensors), flatten(abstract),
                  f"big_vision ViT checkpoint {path}",
                  ignore=() if args["num_classes"] else (r"head/.*",))
  return unflatten({k: jnp.asarray(v) for k, v in flat.items()}, abstract)
