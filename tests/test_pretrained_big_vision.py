"""big_vision `.npz` checkpoints into mmjax.pretrained.vit: the golden ViT's weights
(tests/golden/vit, Hugging Face layout) written under big_vision's names, as its vit.py
lays them out (flax attention kernels [width, heads, head_dim], the class token without
a position, `params/` prefix), scanned (`Transformer/encoderblock` with a depth axis),
and in the pre-linen names of the original ViT checkpoints (with the class token's
position in the table) give the reference's logits within 1e-5 relative."""
import os
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pretrained_vit import GOLDEN, _args, _rel  # noqa: E402

from mmjax.pretrained import checkpoint_files, vit  # noqa: E402


def _big_vision(layout: str) -> dict:
  """The golden weights under big_vision's names (written here from its vit.py)."""
  t = load_file(os.path.join(GOLDEN, "model.safetensors"))
  a = _args()
  d, h = a["width"], a["heads"]
  hf = lambda k: t["vit." + k]
  pos = hf("embeddings.position_embeddings")  # [1, 1 + patches, d]
  out = {"embedding/kernel": hf("embeddings.patch_embeddings.projection.weight").transpose(
             2, 3, 1, 0),
         "embedding/bias": hf("embeddings.patch_embeddings.projection.bias"),
         "Transformer/encoder_norm/scale": hf("layernorm.weight"),
         "Transformer/encoder_norm/bias": hf("layernorm.bias"),
         "head/kernel": t["classifier.weight"].T, "head/bias": t["classifier.bias"]}
  if layout == "pre_linen":  # one table for the class token and the patches
    out["cls"] = hf("embeddings.cls_token")
    out["Transformer/posembed_input/pos_embedding"] = pos
  else:  # the class token's position folded into the token
    out["cls"] = hf("embeddings.cls_token") + pos[:, :1]
    out["pos_embedding"] = pos[:, 1:]
  names = ({"attn": "MultiHeadDotProductAttention_1", "ln0": "LayerNorm_0",
            "ln1": "LayerNorm_2", "mlp": "MlpBlock_3"} if layout == "pre_linen" else
           {"attn": "MultiHeadDotProductAttention_0", "ln0": "LayerNorm_0",
            "ln1": "LayerNorm_1", "mlp": "MlpBlock_0"})
  blocks = []
  for i in range(a["depth"]):
    p = f"encoder.layer.{i}."
    blk = {}
    for name in ("query", "key", "value"):
      blk[f"{names['attn']}/{name}/kernel"] = hf(
          f"{p}attention.attention.{name}.weight").T.reshape(d, h, d // h)
      blk[f"{names['attn']}/{name}/bias"] = hf(
          f"{p}attention.attention.{name}.bias").reshape(h, d // h)
    blk[f"{names['attn']}/out/kernel"] = hf(
        f"{p}attention.output.dense.weight").T.reshape(h, d // h, d)
    blk[f"{names['attn']}/out/bias"] = hf(f"{p}attention.output.dense.bias")
    for ln, src in ((names["ln0"], "layernorm_before"), (names["ln1"], "layernorm_after")):
      blk[f"{ln}/scale"], blk[f"{ln}/bias"] = hf(f"{p}{src}.weight"), hf(f"{p}{src}.bias")
    for j, src in ((0, "intermediate.dense"), (1, "output.dense")):
      blk[f"{names['mlp']}/Dense_{j}/kernel"] = hf(f"{p}{src}.weight").T
      blk[f"{names['mlp']}/Dense_{j}/bias"] = hf(f"{p}{src}.bias")
    blocks.append(blk)
  if layout == "scan":
    for k in blocks[0]:
      out[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
  else:
    for i, blk in enumerate(blocks):
      out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
  return {"params/" + k: v for k, v in out.items()}


@pytest.mark.parametrize("layout", ["pyloop", "scan", "pre_linen"])
def test_big_vision_layouts_give_the_reference_logits(layout, tmp_path):
  path = str(tmp_path / "vit.npz")
  np.savez(path, **_big_vision(layout))
  fam = vit.family(_args())  # the golden model: exact GELU, eps 1e-12
  params = fam.load(path, fam.abstract_params())
  io = np.load(os.path.join(GOLDEN, "io.npz"))
  logits, _ = jax.jit(fam.apply)(params, {"image": io["pixel_values"].transpose(0, 2, 3, 1)})
  assert _rel(logits, io["logits"]) < 1e-5


def test_a_big_vision_checkpoint_that_does_not_fit_is_named(tmp_path):
  tensors = _big_vision("pyloop")
  del tensors["params/Transformer/encoderblock_1/LayerNorm_1/scale"]
  tensors["params/pre_logits/kernel"] = np.zeros((32, 32), np.float32)
  path = str(tmp_path / "vit.npz")
  np.savez(path, **tensors)
  fam = vit.family(_args())
  with pytest.raises(checkpoint_files.CheckpointError, match=r"has a pre_logits layer"):
    fam.load(path, fam.abstract_params())
  del tensors["params/pre_logits/kernel"]
  np.savez(path, **tensors)
  with pytest.raises(checkpoint_files.CheckpointError, match=r"big_vision ViT checkpoint .*: "
                     r"1 missing \(Transformer/encoderblock_1/LayerNorm_1/scale\)"):
    fam.load(path, fam.abstract_params())
  gap = vit.family(_args(pool="gap"))
  with pytest.raises(checkpoint_files.CheckpointError, match=r"does not fit the configured "
                     r"model: 1 missing .*; 1 unexpected \(cls\)\. Is it"):  # has a class token
    gap.load(path, gap.abstract_params())


def _big_vision_siglip(scan: bool) -> dict:
  """The golden SigLIP's weights under big_vision's two_towers names (`img`: a ViT with a
  MAP head; `txt`: a text transformer with a head; `t`, `b`)."""
  from test_pretrained_siglip import GOLDEN as SIGLIP, _args as siglip_args
  t = load_file(os.path.join(SIGLIP, "siglip", "model.safetensors"))
  a = siglip_args()
  d, h = a["image"]["width"], a["image"]["heads"]
  heads_in = lambda w: w.T.reshape(d, h, d // h)  # torch [out, in] -> flax [in, heads, hd]
  out = {}

  def attention(dst, q, k, v, qb, kb, vb, o, ob):
    for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
      out[f"{dst}{name}/kernel"], out[f"{dst}{name}/bias"] = heads_in(w), b.reshape(h, d // h)
    out[f"{dst}out/kernel"], out[f"{dst}out/bias"] = o.T.reshape(h, d // h, d), ob

  def block(dst, src):
    g = lambda k: t[src + k]
    attention(f"{dst}MultiHeadDotProductAttention_0/", *(g(f"self_attn.{p}_proj.{w}") for w, p in (
        ("weight", "q"), ("weight", "k"), ("weight", "v"), ("bias", "q"), ("bias", "k"),
        ("bias", "v"))), g("self_attn.out_proj.weight"), g("self_attn.out_proj.bias"))
    for ln, s in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
      out[f"{dst}{ln}/scale"], out[f"{dst}{ln}/bias"] = g(f"{s}.weight"), g(f"{s}.bias")
    for j in (0, 1):
      out[f"{dst}MlpBlock_0/Dense_{j}/kernel"] = g(f"mlp.fc{j + 1}.weight").T
      out[f"{dst}MlpBlock_0/Dense_{j}/bias"] = g(f"mlp.fc{j + 1}.bias")

  v, x = "vision_model.", "text_model."
  out["img/embedding/kernel"] = t[v + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)
  out["img/embedding/bias"] = t[v + "embeddings.patch_embedding.bias"]
  out["img/pos_embedding"] = t[v + "embeddings.position_embedding.weight"][None]
  out["img/Transformer/encoder_norm/scale"] = t[v + "post_layernorm.weight"]
  out["img/Transformer/encoder_norm/bias"] = t[v + "post_layernorm.bias"]
  hd = v + "head."
  out["img/MAPHead_0/probe"] = t[hd + "probe"]
  w, b = t[hd + "attention.in_proj_weight"], t[hd + "attention.in_proj_bias"]
  attention("img/MAPHead_0/MultiHeadDotProductAttention_0/", w[:d], w[d:2 * d], w[2 * d:],
            b[:d], b[d:2 * d], b[2 * d:], t[hd + "attention.out_proj.weight"],
            t[hd + "attention.out_proj.bias"])
  out["img/MAPHead_0/LayerNorm_0/scale"] = t[hd + "layernorm.weight"]
  out["img/MAPHead_0/LayerNorm_0/bias"] = t[hd + "layernorm.bias"]
  for j in (0, 1):
    out[f"img/MAPHead_0/MlpBlock_0/Dense_{j}/kernel"] = t[f"{hd}mlp.fc{j + 1}.weight"].T
    out[f"img/MAPHead_0/MlpBlock_0/Dense_{j}/bias"] = t[f"{hd}mlp.fc{j + 1}.bias"]
  out["txt/Embed_0/embedding"] = t[x + "embeddings.token_embedding.weight"]
  out["txt/pos_embedding"] = t[x + "embeddings.position_embedding.weight"][None]
  out["txt/Transformer/encoder_norm/scale"] = t[x + "final_layer_norm.weight"]
  out["txt/Transformer/encoder_norm/bias"] = t[x + "final_layer_norm.bias"]
  out["txt/head/kernel"], out["txt/head/bias"] = t[x + "head.weight"].T, t[x + "head.bias"]
  out["t"], out["b"] = t["logit_scale"], t["logit_bias"]
  for tower, src, depth in (("img", v, a["image"]["depth"]), ("txt", x, a["text"]["depth"])):
    for i in range(depth):
      block(f"{tower}/Transformer/encoderblock_{i}/", f"{src}encoder.layers.{i}.")
    if scan:
      prefix = f"{tower}/Transformer/encoderblock_0/"
      for k in [k for k in out if k.startswith(prefix)]:
        rest = k[len(prefix):]
        out[f"{tower}/Transformer/encoderblock/{rest}"] = np.stack(
            [out.pop(f"{tower}/Transformer/encoderblock_{i}/{rest}") for i in range(depth)])
  return {"params/" + k: val for k, val in out.items()}


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_siglip_gives_the_reference_embeddings(scan, tmp_path):
  from test_pretrained_siglip import GOLDEN as SIGLIP, _args as siglip_args, _unit
  from mmjax.pretrained import siglip
  path = str(tmp_path / "siglip.npz")
  np.savez(path, **_big_vision_siglip(scan))
  fam = siglip.family(siglip_args())  # the golden model (big_vision's own: the same GELU)
  params = fam.load(path, fam.abstract_params())
  io = np.load(os.path.join(SIGLIP, "siglip", "io.npz"))
  out, _ = jax.jit(fam.apply)(params, {"image": io["pixel_values"].transpose(0, 2, 3, 1),
                                       "text": io["input_ids"].astype(np.int32)})
  assert _rel(_unit(out["image"]), io["image_embeds"]) < 1e-5
  assert _rel(_unit(out["text"]), io["text_embeds"]) < 1e-5
  z = np.exp(float(out["logit_scale"])) * _unit(out["image"]) @ _unit(out["text"]).T
  assert _rel(z + float(out["logit_bias"]), io["logits_per_image"]) < 1e-5
