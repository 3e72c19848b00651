"""Module hooks (protocol v2): a method that drops half the tokens after block 1 of a
foreign linen ViT changes the shapes the later blocks see and the FLOPs XLA counts; hooks
on mmjax's own model; a pattern that matches no module and a hook whose output the next
module cannot take are one-line errors before anything runs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import Method, Plan, hooks

D, T, DEPTH = 32, 16, 4


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.SelfAttention(num_heads=4, name="attn")(nn.LayerNorm(name="ln1")(x))
    h = nn.Dense(4 * D, name="fc1")(nn.LayerNorm(name="ln2")(x))
    return x + nn.Dense(D, name="fc2")(nn.gelu(h))


class ViT(nn.Module):
  """A ViT as a user writes it: patches, blocks, mean-pooled head."""
  @nn.compact
  def __call__(self, images):
    x = nn.Conv(D, (4, 4), strides=4, name="stem")(images)
    x = x.reshape(x.shape[0], -1, D)
    seen = []
    for i in range(DEPTH):
      x = Block(name=f"block_{i}")(x)
      seen.append(x.shape[1])
    self.sow("intermediates", "tokens", tuple(seen))
    return nn.Dense(10, name="head")(x.mean(1))


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_dropping_half_the_tokens_after_block_1_of_a_foreign_vit():
  model = ViT()
  images = jnp.ones((2, 16, 16, 3))  # 16 tokens of 4x4 patches
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  apply = lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"])
  calls = []

  def keep_first_half(out, state):
    calls.append(out.shape)
    return out[:, : out.shape[1] // 2]

  plan = Plan(Method("drop_half", hooks=((r"block_1", keep_first_half),)))
  plan.check_hooks(apply, params, {}, images)
  hooked = plan.wrap(apply, {}, list(params))
  (logits, inter) = hooked(params, images)
  assert logits.shape == (2, 10)
  assert inter["intermediates"]["tokens"][0] == (T, T // 2, T // 2, T // 2)
  assert calls[-1] == (2, T, D)  # the hook saw block_1's own output

  dense = _flops(lambda p, x: apply(p, x)[0], params, images)
  dropped = _flops(lambda p, x: hooked(p, x)[0], params, images)
  # blocks 2 and 3 on half the tokens: their matmuls cost half (attention's T^2 part a
  # quarter); every block costs the same, so the total is between 5/8 and 3/4 of dense
  assert 0.55 * dense < dropped < 0.8 * dense, (dropped / dense)


def test_hooks_on_mmjax_own_model_and_bad_hooks():
  from experiments.configs.common import base_config
  from mmjax.harness import family
  fam = family.from_config(base_config(tiny=True))
  batch = fam.example_batch(2, with_labels=False)
  params = fam.init(jax.random.PRNGKey(0), batch)
  paths = hooks.module_paths(fam.apply, params, batch)
  block = next(p for p in paths if p.endswith("block_00") or p.endswith("block_0"))
  # each feature scaled differently (a LayerNorm after the block undoes a common scale)
  ramp = lambda out, st: out * jnp.linspace(0.0, 2.0, out.shape[-1])
  scaled = Plan(Method("scale", hooks=((block, ramp),)))
  scaled.check_hooks(fam.apply, params, {}, batch)
  a = fam.apply(params, batch)[0]
  b = scaled.wrap(fam.apply, {}, list(params))(params, batch)[0]
  assert a.shape == b.shape and not np.allclose(a, b)

  typo = Plan(Method("typo", hooks=((block.replace("block", "blok"), lambda o, s: o),)))
  with pytest.raises(ValueError, match=r"'typo': hook pattern .* matches no module of the "
                     r"forward; nearest module paths: \[.*block"):
    typo.check_hooks(fam.apply, params, {}, batch)
  bad = Plan(Method("bad", hooks=((block, lambda out, st: out[..., :3]),)))
  with pytest.raises(ValueError, match=r"'bad': the hook on .* returns an output the rest "
                     r"of the forward cannot take"):
    bad.check_hooks(fam.apply, params, {}, batch)


def test_nnx_hooks_by_attribute_path_and_classes_restored():
  from flax import nnx

  class NnxBlock(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
      return x + jnp.tanh(self.fc(x))

  class NnxEncoder(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([NnxBlock(rngs) for _ in range(DEPTH)])
      self.head = nnx.Linear(D, 10, rngs=rngs)

    def __call__(self, x):
      for b in self.blocks:
        x = b(x)
      return self.head(x.mean(1))

  graphdef, state = nnx.split(NnxEncoder(nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)

  def apply(p, x):  # an NNX forward calls its root through hooks.call
    s = nnx.clone(state)
    nnx.replace_by_pure_dict(s, p)
    return hooks.call(nnx.merge(graphdef, s), x)

  x = jax.random.normal(jax.random.PRNGKey(1), (2, T, D))
  before = {cls: vars(cls)["__call__"] for cls in (NnxBlock, NnxEncoder, nnx.Linear)}
  paths = hooks.module_paths(apply, params, x)
  assert "blocks/1" in paths and "blocks/1/fc" in paths and "head" in paths
  seen = []

  def keep_first_half(out, st):
    seen.append(out.shape)
    return out[:, : out.shape[1] // 2]

  plan = Plan(Method("drop_half", hooks=((r"blocks/1", keep_first_half),)))
  plan.check_hooks(apply, params, {}, x)
  got = jax.jit(plan.wrap(apply, {}, []))(params, x)
  assert seen[-1] == (2, T, D)

  # the reference: the same weights applied by hand in float64, half the tokens after block 1
  w = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.asarray(x, np.float64)
  for i in range(DEPTH):
    h = h + np.tanh(h @ w["blocks"][i]["fc"]["kernel"] + w["blocks"][i]["fc"]["bias"])
    if i == 1:
      h = h[:, : T // 2]
  want = h.mean(1) @ w["head"]["kernel"] + w["head"]["bias"]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # no class was left patched: the plain forward keeps every token
  plain = np.asarray(apply(params, x))
  assert not np.allclose(plain, want, atol=1e-3)
  # a hook that raises leaves nothing patched either
  boom = Plan(Method("boom", hooks=((r"blocks/2", lambda out, st: 1 / 0),)))
  with pytest.raises(ZeroDivisionError):
    boom.wrap(apply, {}, [])(params, x)
  assert {cls: vars(cls)["__call__"] for cls in before} == before

  # a submodel called through hooks.call inside a hooked call is hooked once, not twice
  class Pair(nnx.Module):
    def __init__(self, rngs):
      self.enc = NnxEncoder(rngs)

    def __call__(self, x):
      return hooks.call(self.enc, x)

  pair, count = Pair(nnx.Rngs(0)), []
  counting = Plan(Method("count", hooks=((r".*blocks/1", lambda out, st: count.append(1) or out),)))
  counting.wrap(lambda p, x: hooks.call(pair, x), {}, [])(None, x)
  assert len(count) == 1

  typo = Plan(Method("typo", hooks=((r"block/1", keep_first_half),)))
  with pytest.raises(ValueError, match=r"'typo': hook pattern 'block/1' matches no module "
                     r"of the forward; nearest module paths: \['blocks/1'"):
    typo.check_hooks(apply, params, {}, x)
  plain_jax = lambda p, x: x @ p["w"]
  with pytest.raises(ValueError, match=r"module hooks need a forward made of Flax modules"):
    plan.check_hooks(plain_jax, {"w": jnp.ones((D, 3))}, {}, x)


def test_the_trainer_checks_hooks_before_anything_is_written(procedural_dir, tmp_path):
  from experiments.configs import dense
  from mmjax.harness import train
  config = dense.get_config("tiny")
  config.data.data_dir, config.mesh.data, config.train.steps = procedural_dir, 1, 2
  plan = Plan(Method("typo", hooks=((r"image/blok_00", lambda out, st: out),)))
  with pytest.raises(ValueError, match=r"'typo': hook pattern 'image/blok_00' matches no "
                     r"module of the forward; nearest module paths: \['image/block_00'"):
    train.train_and_evaluate(config, str(tmp_path / "w"), plan=plan, log=lambda *a: None)
  assert not (tmp_path / "w").exists()
