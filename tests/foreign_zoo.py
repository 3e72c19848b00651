"""Small models shaped like ones mmjax did not write, each with a convolution where the
originals have one; random weights, random inputs. Written here (no `transformers` or
torch): the layers and parameter paths follow the originals, the sizes are tiny.

  vit      Flax linen, big_vision-like: Conv patch embedding ("embedding"), a cls token,
           pre-LN encoder blocks ("Transformer/encoderblock_i") with
           nn.MultiHeadDotProductAttention and an MLP, final LN, a Dense head
  whisper  Flax NNX, Whisper's audio encoder: two Conv over time (k=3; the second with
           stride 2), GELU, sinusoidal positions, pre-LN blocks with nnx.MultiHeadAttention
  clip     Flax linen, CLIP-like two towers of one block each: text (token embedding,
           positions, a causal block, final LN, projection at the last token), vision (Conv
           patch embedding without bias, class embedding, a block, LN, projection), a
           scalar logit_scale

Each `make_*()` returns (params, apply_fn(params, batch) -> output, batches(n, seed)).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

WIDTH, HEADS, MLP = 32, 2, 64


# ------------------------------------------------------------------- linen blocks

class _MlpBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(WIDTH, name="Dense_1")(nn.gelu(nn.Dense(MLP, name="Dense_0")(x)))


class _EncoderBlock(nn.Module):
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if self.causal else None
    h = nn.LayerNorm(name="LayerNorm_0")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="MultiHeadDotProductAttention_0"
                                            )(h, h, mask=mask)
    return x + _MlpBlock(name="MlpBlock_0")(nn.LayerNorm(name="LayerNorm_1")(x))


class _Encoder(nn.Module):
  depth: int = 2
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = _EncoderBlock(self.causal, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(name="encoder_norm")(x)


# ------------------------------------------------------------------------- ViT

class ViT(nn.Module):
  patch: int = 4
  classes: int = 5

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(WIDTH, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", name="embedding")(image)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, d))
    x = _Encoder(name="Transformer")(x)
    return nn.Dense(self.classes, name="head")(x[:, 0])


@functools.lru_cache(None)  # built once per session: the tests only read it
def make_vit():
  model = ViT()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]

  def batches(n, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(4, 16, 16, 3)), jnp.float32) for _ in range(n)]
  return params, lambda p, x: model.apply({"params": p}, x), batches


# ---------------------------------------------------------------- Whisper (NNX)

def sinusoids(length, channels, max_timescale=10000.0):
  """Whisper's fixed positional embedding [length, channels]."""
  inc = np.log(max_timescale) / (channels // 2 - 1)
  inv = np.exp(-inc * np.arange(channels // 2))
  t = np.arange(length)[:, None] * inv[None, :]
  return jnp.asarray(np.concatenate([np.sin(t), np.cos(t)], axis=1), jnp.float32)


class _NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn_ln = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
    self.mlp_ln = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.fc1 = nnx.Linear(WIDTH, MLP, rngs=rngs)
    self.fc2 = nnx.Linear(MLP, WIDTH, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.attn_ln(x))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.mlp_ln(x))))


class WhisperEncoder(nnx.Module):
  def __init__(self, n_mels=8, depth=2, *, rngs):
    self.conv1 = nnx.Conv(n_mels, WIDTH, (3,), padding=((1, 1),), rngs=rngs)
    self.conv2 = nnx.Conv(WIDTH, WIDTH, (3,), strides=(2,), padding=((1, 1),), rngs=rngs)
    self.blocks = nnx.List([_NnxBlock(rngs) for _ in range(depth)])
    self.ln_post = nnx.LayerNorm(WIDTH, rngs=rngs)

  def __call__(self, mel):  # [b, frames, n_mels]
    x = jax.nn.gelu(self.conv1(mel))
    x = jax.nn.gelu(self.conv2(x))
    x = x + sinusoids(x.shape[1], WIDTH)
    for block in self.blocks:
      x = block(x)
    return self.ln_post(x)


@functools.lru_cache(None)  # built once per session: the tests only read it
def make_whisper():
  graphdef, state = nnx.split(WhisperEncoder(rngs=nnx.Rngs(0)))

  def apply(p, mel):
    s = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s)(mel)

  def batches(n, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(4, 20, 8)), jnp.float32) for _ in range(n)]
  return nnx.to_pure_dict(state), apply, batches


# ------------------------------------------------------------------------- CLIP

VOCAB, TEXT_LEN = 50, 8


class _TextTower(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, WIDTH, name="token_embedding")(tokens)
    x = x + self.param("positional_embedding", nn.initializers.normal(0.01),
                       (TEXT_LEN, WIDTH))
    x = _Encoder(depth=1, causal=True, name="transformer")(x)
    x = nn.LayerNorm(name="ln_final")(x)
    return nn.Dense(WIDTH, use_bias=False, name="text_projection")(x[:, -1])


class _VisionTower(nn.Module):
  patch: int = 4

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(WIDTH, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", use_bias=False, name="conv1")(image)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (d,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    x = x + self.param("positional_embedding", nn.initializers.normal(0.02), (h * w + 1, d))
    x = nn.LayerNorm(name="ln_pre")(x)
    x = _Encoder(depth=1, name="transformer")(x)
    x = nn.LayerNorm(name="ln_post")(x[:, 0])
    return nn.Dense(WIDTH, use_bias=False, name="proj")(x)


class CLIP(nn.Module):
  @nn.compact
  def __call__(self, batch):
    img = _VisionTower(name="visual")(batch["image"])
    txt = _TextTower(name="text")(batch["text"])
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    scale = self.param("logit_scale", lambda _: jnp.float32(np.log(1 / 0.07)))
    return jnp.exp(scale) * img @ txt.T


@functools.lru_cache(None)  # built once per session: the tests only read it
def make_clip():
  model = CLIP()
  sample = {"image": jnp.zeros((1, 16, 16, 3)), "text": jnp.zeros((1, TEXT_LEN), jnp.int32)}
  params = jax.jit(model.init)(jax.random.PRNGKey(0), sample)["params"]

  def batches(n, seed=0):
    r = np.random.default_rng(seed)
    return [{"image": jnp.asarray(r.normal(size=(4, 16, 16, 3)), jnp.float32),
             "text": jnp.asarray(r.integers(0, VOCAB, size=(4, TEXT_LEN)), jnp.int32)}
            for _ in range(n)]
  return params, lambda p, b: model.apply({"params": p}, b), batches


MODELS = {"vit": make_vit, "whisper": make_whisper, "clip": make_clip}
# the convolutions of each, which int8 activations do not rewrite
CONVS = {"vit": ["embedding/kernel"], "whisper": ["conv1/kernel", "conv2/kernel"],
         "clip": ["visual/conv1/kernel"]}
