"""A two-tower model outside the package (`config.model_module="toy_two_towers"`), the
shape of CLIP and SigLIP: an image tower (conv patch stem, mean pool, projection) and a
text tower (token embedding, masked mean, projection) that output one embedding each and
CLIP's learnable `logit_scale`, for `mmjax.tasks.retrieval` (tests/test_task_retrieval.py)."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.data.tokenizer import VOCAB_SIZE
from mmjax.harness.family import Family

ARGS = {"width": 32, "dim": 16}


class TwoTowers(nn.Module):
  width: int
  dim: int

  @nn.compact
  def __call__(self, batch, rng=None):
    x = nn.Conv(self.width, (7, 7), strides=7, padding="VALID", name="stem")(batch["image"])
    image = nn.Dense(self.dim, name="image_proj")(nn.gelu(x.mean(axis=(1, 2))))
    t = nn.Embed(VOCAB_SIZE, self.width, name="embed")(batch["text"])
    m = batch["text_mask"].astype(jnp.float32)[..., None]
    t = (t * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    text = nn.Dense(self.dim, name="text_proj")(nn.gelu(nn.Dense(self.width, name="text_mlp")(t)))
    scale = self.param("logit_scale", lambda _: jnp.log(jnp.float32(1 / 0.07)))
    return {"image": image, "text": text, "logit_scale": scale}, {}


def family(args: dict) -> Family:
  a = {**ARGS, **args}
  model = TwoTowers(**a)

  def example_batch(batch_size, data=None, seed=0, with_labels=True):
    rng = np.random.default_rng(seed)
    n = data.text_len if data is not None else 48
    return {"image": rng.uniform(0, 1, (batch_size, 28, 28, 1)).astype(np.float32),
            "text": rng.integers(0, VOCAB_SIZE, (batch_size, n)).astype(np.int32),
            "text_mask": np.ones((batch_size, n), bool)}

  return Family(
      "toy_two_towers", init=lambda rng, batch: model.init(rng, batch)["params"],
      apply=lambda params, batch, rng=None: model.apply({"params": params}, batch),
      example_batch=example_batch, modalities=("image", "text"),
      patterns={"matmul": r".*(proj|mlp)/kernel", "weights": r".*(proj|mlp)/kernel",
                "activations": r".*(proj|mlp)/kernel"}, args=a)
