"""ViT (Dosovitskiy et al. 2021) in the layout of Hugging Face's `ViTModel` /
`ViTForImageClassification` (AugReg and DeiT weights): a conv patch stem, a class token,
learned position embeddings, pre-LN blocks, a final LayerNorm, and a linear head on the
class token. A model module (`config.model_module = "mmjax.pretrained.vit"`):

    config.model = dict(variant="B/16", image_size=224, num_classes=1000)
    config.init = "/path/to/model.safetensors"      # a Hugging Face ViT checkpoint
    # big_vision / vision_transformer .npz (AugReg): pool="cls" ("tok") or "gap",
    # activation="gelu_tanh" (flax's nn.gelu), eps=1e-6 (flax's LayerNorm)

The input is `batch["image"]`, `[batch, height, width, channels]`, already resized and
normalized as the checkpoint expects. `apply` returns (logits, intermediates: each
block's tokens, the final tokens, the pooled class token); with `num_classes=0`, the
pooled features instead of logits.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.harness.family import Family
from mmjax.pretrained import checkpoint_files, inputs, model_args
from mmjax.pretrained.checkpoint_files import Tensor
from mmjax.pretrained.encoder import check_activation, encode

SIZES = {  # width, depth, heads, mlp_dim
    "Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096), "H": (1280, 32, 16, 5120)}
ARGS = {"variant": "B/16", "width": None, "depth": None, "heads": None, "mlp_dim": None,
        "patch": None, "image_size": 224, "channels": 3, "num_classes": 1000, "eps": 1e-12,
        "pool": "cls", "activation": "gelu", "attention_impl": None, "processor": None,
        "new_head": False}
POOLS = ("cls", "gap")  # the class token (HF, big_vision "tok"); the mean (big_vision "gap")
MATMULS = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc1|fc2))/kernel"


def resolve(args: dict) -> dict:
  """ARGS with the variant's sizes filled in (explicit fields win); checked."""
  a = model_args.merge(args, ARGS, "mmjax.pretrained.vit")
  if a["variant"]:
    sizes, patch = model_args.variant(a["variant"], SIZES, ", ".join(f"{s}/16" for s in SIZES),
                                      patched=True)
    model_args.fill(a, dict(zip(model_args.TOWER, sizes), patch=patch))
  model_args.require(a, model_args.TOWER + ("patch",), "B/16")
  model_args.check_patch(a)
  model_args.check_tower({k: a[k] for k in model_args.TOWER}, "config.model")
  if a["pool"] not in POOLS:
    raise ValueError(f"config.model.pool={a['pool']!r} is unknown; valid: {', '.join(POOLS)}.")
  check_activation(a["activation"], "config.model.activation")
  return a


class ViT(nn.Module):
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  image_size: int
  channels: int
  num_classes: int
  eps: float
  pool: str = "cls"
  activation: str = "gelu"
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, batch, rng=None):
    image = batch["image"]
    if image.shape[1:] != (self.image_size, self.image_size, self.channels):
      raise ValueError(f"ViT expects images [batch, {self.image_size}, {self.image_size}, "
                       f"{self.channels}], got {tuple(image.shape)}; resize them first.")
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                name="stem")(image)
    x = x.reshape(x.shape[0], -1, self.width)
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    inter = {}
    x = encode(x, None, self.depth, dict(num_heads=self.heads, mlp_dim=self.mlp_dim,
                                         eps=self.eps, activation=self.activation,
                                         implementation=self.attention_impl), inter)
    x = inter["final"] = nn.LayerNorm(self.eps, name="norm")(x)
    pooled = inter["pooled"] = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
    if not self.num_classes:
      return pooled, inter
    return nn.Dense(self.num_classes, name="head")(pooled), inter


# ------------------------------------------------------------------ Hugging Face names

def _linear(w):
  return np.ascontiguousarray(w.T)  # torch Linear [out, in] -> [in, out]


def hf_spec(a: dict, prefix: str) -> list:
  """The (Hugging Face name, mmjax path, conversion) of every tensor."""
  e = f"{prefix}embeddings."
  spec = [Tensor(f"{e}cls_token", "cls"),
          Tensor(f"{e}position_embeddings", "pos_embedding"),
          Tensor(f"{e}patch_embeddings.projection.weight", "stem/kernel",
                 lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))),
          Tensor(f"{e}patch_embeddings.projection.bias", "stem/bias"),
          Tensor(f"{prefix}layernorm.weight", "norm/scale"),
          Tensor(f"{prefix}layernorm.bias", "norm/bias")]
  parts = {"attention.attention.query": "attn/query", "attention.attention.key": "attn/key",
           "attention.attention.value": "attn/value", "attention.output.dense": "attn/out",
           "intermediate.dense": "mlp/fc1", "output.dense": "mlp/fc2"}
  norms = {"layernorm_before": "ln_attn", "layernorm_after": "ln_mlp"}
  for i in range(a["depth"]):
    src, dst = f"{prefix}encoder.layer.{i}.", f"block_{i:02d}/"
    for s, d in parts.items():
      spec += [Tensor(f"{src}{s}.weight", f"{dst}{d}/kernel", _linear),
               Tensor(f"{src}{s}.bias", f"{dst}{d}/bias")]
    for s, d in norms.items():
      spec += [Tensor(f"{src}{s}.weight", f"{dst}{d}/scale"),
               Tensor(f"{src}{s}.bias", f"{dst}{d}/bias")]
  if a["num_classes"]:
    spec += [Tensor("classifier.weight", "head/kernel", _linear),
             Tensor("classifier.bias", "head/bias")]
  return spec


def load(path: str, abstract, args: dict):
  """A Hugging Face ViT checkpoint (`ViTModel` or `ViTForImageClassification`
  `.safetensors`) or a big_vision one (`.npz`) -> params shaped like `abstract`."""
  checkpoint_files.check_format(path, "mmjax.pretrained.vit", npz=True)
  if str(path).endswith(".npz"):
    from mmjax.pretrained import big_vision
    return big_vision.load_vit(path, abstract, args)
  if args["pool"] != "cls":
    raise checkpoint_files.CheckpointError(
        f"checkpoint {path}: Hugging Face's ViT pools the class token; set "
        "config.model.pool='cls'.")
  tensors = checkpoint_files.read_safetensors(path)
  prefix = "vit." if any(k.startswith("vit.") for k in tensors) else ""
  fresh = checkpoint_files.fresh_head(args, "classifier.weight" in tensors)
  return checkpoint_files.to_params(
      tensors, hf_spec({**args, "num_classes": 0} if fresh else args, prefix), abstract,
      f"ViT checkpoint {path}", new=("head/",) if fresh else (),
      ignore=(rf"{prefix}pooler\..*",) + ((r"classifier\..*",) if fresh else ()))



def family(args: dict) -> Family:
  a = resolve(args)
  model = ViT(**{k: a[k] for k in ("width", "depth", "heads", "mlp_dim", "patch",
                                    "image_size", "channels", "num_classes", "eps", "pool",
                                    "activation", "attention_impl")})

  def example_batch(batch_size, data=None, seed=0, with_labels=True):
    rng = np.random.default_rng(seed)
    s = a["image_size"]
    out = {"image": rng.normal(size=(batch_size, s, s, a["channels"])).astype(np.float32)}
    if with_labels:
      out["label"] = rng.integers(0, max(a["num_classes"], 1), batch_size).astype(np.int32)
    return out

  return Family(
      "mmjax.pretrained.vit", init=lambda rng, batch: model.init(rng, batch)["params"],
      apply=lambda params, batch, rng=None: model.apply({"params": params}, batch),
      example_batch=example_batch, modalities=("image",),
      patterns={"matmul": MATMULS, "weights": r".*kernel", "activations": MATMULS},
      labels=tuple(str(i) for i in range(a["num_classes"])) or None,
      load=lambda path, abstract: load(path, abstract, a),
      unit_types={"attention": r".*/attn/\w+/kernel", "mlp": r".*/mlp/\w+/kernel",
                  "stem": r"stem/kernel", "head": r"head/kernel"},
      preprocess=inputs.preprocess("vit", a, ("image",)) if a["channels"] == 3 else None,
      args=a)
