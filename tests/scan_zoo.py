"""A tiny linen ViT-like encoder built twice with the same weights: its 3 blocks stacked
under `nn.scan` (optionally each under `nn.remat`, as big_vision's `scan=True` and MaxText
do), and unrolled as `block_0..2` (the twin every stacked result is compared with).
`unstack` maps the stacked parameters onto the twin's."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

DEPTH, WIDTH, TOKENS = 3, 16, 5


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    h = nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
    x = x + h
    h = nn.Dense(2 * WIDTH)(nn.LayerNorm()(x))
    x = x + nn.Dense(WIDTH)(nn.gelu(h))
    return x, None


class Encoder(nn.Module):
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embed")(x)
    if self.scan:
      block = nn.remat(Block) if self.remat else Block
      x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=DEPTH)(name="blocks")(x, None)
    else:
      for i in range(DEPTH):
        x, _ = Block(name=f"block_{i}")(x)
    return nn.Dense(4, name="head")(x.mean(axis=1))


def unstack(params):
  """Stacked parameters -> the unrolled twin's (`blocks` leaf [DEPTH, ...] -> block_i)."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(DEPTH):
    out[f"block_{i}"] = jax.tree.map(lambda a: a[i], params["blocks"])
  return out


@functools.lru_cache(maxsize=None)
def make(remat: bool = False, seed: int = 0):
  """-> (stacked params, apply_stacked, apply_twin, batches); cached, so that jitted
  programs of the same functions are compiled once per process."""
  r = np.random.default_rng(seed)
  batches = [jnp.asarray(r.normal(size=(4, TOKENS, 8)), jnp.float32) for _ in range(2)]
  stacked, twin = Encoder(scan=True, remat=remat), Encoder(scan=False)
  params = stacked.init(jax.random.PRNGKey(seed), batches[0])["params"]
  apply_s = lambda p, b: stacked.apply({"params": p}, b)
  apply_t = lambda p, b: twin.apply({"params": p}, b)
  return params, apply_s, apply_t, batches
