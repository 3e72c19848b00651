"""A model module written outside mmjax (`config.model_module="toy_family"`), the way a
user's `my_lab.models.foo` would be: a small image classifier (a conv patch stem, two
residual MLP blocks, a linear head) that reads only `image`, and loads its own checkpoint
format (`.npz` of flat parameter paths). `tests/test_any_model.py` runs it through every
experiment entry point by config alone."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.harness.family import Family

ARGS = {"width": 32, "blocks": 2, "patch": 7, "classes": 10, "dropout": 0.0}


class Block(nn.Module):
  width: int
  dropout: float

  @nn.compact
  def __call__(self, x, rng=None):
    h = nn.gelu(nn.Dense(2 * self.width, name="up")(nn.LayerNorm(name="norm")(x)))
    h = nn.Dropout(self.dropout, deterministic=rng is None)(h, rng=rng)
    return x + nn.Dense(self.width, name="down")(h)


class Toy(nn.Module):
  width: int
  blocks: int
  patch: int
  classes: int
  dropout: float

  @nn.compact
  def __call__(self, batch, rng=None):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                name="stem")(batch["image"])
    x = x.reshape(x.shape[0], -1, self.width)
    feats = {}
    for i in range(self.blocks):
      x = feats[f"block_{i}"] = Block(self.width, self.dropout, name=f"block_{i}")(x, rng)
    pooled = x.mean(axis=1)
    return nn.Dense(self.classes, name="head")(pooled), dict(feats, pooled=pooled)


def family(args: dict) -> Family:
  bad = sorted(set(args) - set(ARGS))
  if bad:
    raise ValueError(f"config.model has unknown field(s) {bad} for toy_family; valid: "
                     f"{sorted(ARGS)}.")
  a = {**ARGS, **args}
  if a["width"] <= 0 or 28 % a["patch"]:
    raise ValueError(f"config.model: width={a['width']} must be > 0 and patch={a['patch']} "
                     "must divide 28.")
  model = Toy(**a)

  def example_batch(batch_size, data=None, seed=0, with_labels=True):
    rng = np.random.default_rng(seed)
    out = {"image": rng.uniform(0, 1, (batch_size, 28, 28, 1)).astype(np.float32)}
    if with_labels:
      out["label"] = rng.integers(0, a["classes"], batch_size).astype(np.int32)
    return out

  def load(path, abstract):
    from mmjax.compress import flatten, unflatten
    with np.load(path) as z:
      flat = {k: jnp.asarray(z[k]) for k in z.files}
    return unflatten(flat, abstract) if set(flat) == set(flatten(abstract)) else flat

  return Family(
      "toy", init=lambda rng, batch: model.init(rng, batch)["params"],
      apply=lambda params, batch, rng=None: model.apply({"params": params}, batch, rng),
      example_batch=example_batch, modalities=("image",),
      patterns={"matmul": r"block_\d+/(up|down)/kernel", "weights": r".*kernel",
                "activations": r"block_\d+/(up|down)/kernel"},
      labels=tuple(f"class {i}" for i in range(a["classes"])), load=load,
      unit_types={"up": r".*/up/kernel", "down": r".*/down/kernel"}, args=a)
