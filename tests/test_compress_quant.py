"""Weight fake-quantization: levels, idempotence, the straight-through gradient, against a
float64 NumPy reference."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import quant


def _reference(w, bits, per_channel, clip_ratio=1.0):
  w = np.asarray(w, np.float64)
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  c = np.abs(w).max(axis=axes, keepdims=per_channel) * clip_ratio
  s = np.maximum(c, 1e-30) / (2 ** (bits - 1) - 1)
  return np.round(np.clip(w, -c, c) / s) * s


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(bits=st.integers(2, 8), per_channel=st.booleans(),
                  shape=st.sampled_from([(5, 7), (3, 3, 2, 4), (64, 16)]),
                  seed=st.integers(0, 9999))
def test_levels_idempotence_and_reference(bits, per_channel, shape, seed):
  g = "channel" if per_channel else "tensor"
  w = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
  q = np.asarray(quant.fake_quant(w, bits, g))
  np.testing.assert_allclose(q, _reference(w, bits, per_channel), rtol=1e-5, atol=1e-6)
  cols = q.reshape(-1, shape[-1]) if per_channel else q.reshape(-1, 1)
  for j in range(cols.shape[1]):
    assert len(np.unique(cols[:, j])) <= 2 ** bits - 1
  codes1, s1 = quant.quantize(w, bits, g)
  codes2, _ = quant.quantize(jnp.asarray(q), bits, g)
  np.testing.assert_array_equal(codes1, codes2)  # quantizing the view again: same codes
  np.testing.assert_allclose(np.asarray(codes1, np.float32) * np.asarray(s1), q, rtol=1e-6,
                             atol=1e-7)
  assert np.abs(np.asarray(codes1)).max() <= 2 ** (bits - 1) - 1


def test_ste_gradient_identity_inside_clip_zero_outside():
  w = jnp.asarray(np.linspace(-2.0, 2.0, 41, dtype=np.float32).reshape(41, 1))
  g = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, 4, "tensor", clip_ratio=0.5) * 3.0))(w)
  inside = np.abs(np.asarray(w)) <= 1.0
  np.testing.assert_array_equal(np.asarray(g)[inside], 3.0)
  np.testing.assert_array_equal(np.asarray(g)[~inside], 0.0)


def test_int8_error_is_bounded_by_half_a_step():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(128, 32)), jnp.float32)
  q = quant.fake_quant(w, 8, "channel")
  step = np.abs(np.asarray(w)).max(axis=0) / 127
  assert (np.abs(np.asarray(q - w)) <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("shape, contract", [
    ((16, 2, 4), (0,)),      # DenseGeneral q/k/v [in, heads, head_dim]: per (head, dim)
    ((2, 4, 6), (0, 1)),     # DenseGeneral out [heads, head_dim, out]: per out
    ((3, 3, 4, 5), None),    # Conv [h, w, in, out]: per out
])
def test_per_channel_scales_follow_the_rule_layout(shape, contract):
  from mmjax.compress import Plan, rules
  w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  plan = Plan(rules([(r"k", quant.weights(8, contract=contract))]))
  v = np.asarray(plan.view({"k": jnp.asarray(w)}, plan.init({"k": w}, None))["k"])
  axes = tuple(range(len(shape) - 1)) if contract is None else contract
  c = np.abs(w.astype(np.float64)).max(axis=axes, keepdims=True)  # float64 reference
  ref = np.round(w / (c / 127)) * (c / 127)
  np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-6)
  outs = [a for a in range(len(shape)) if a not in axes]
  out = np.moveaxis(v, outs, list(range(len(outs))))
  out = out.reshape(int(np.prod([shape[a] for a in range(len(shape)) if a not in axes])), -1)
  assert all(len(np.unique(row)) <= 255 for row in out)  # <= 255 levels per output channel
  info = plan.describe({"k": jnp.asarray(w)}, plan.init({"k": w}, None))["k"]
  assert info.codes.contract == axes and info.bits == 8  # grid codes, a scale per channel
  assert info.codes.scale.shape == (1, out.shape[0])
  np.testing.assert_allclose(np.asarray(info.codes.scale).reshape(-1),
                             (c / 127).reshape(-1) if c.size > 1 else c.reshape(-1), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), r"bits=1 must be an integer in 2..8"),
    (dict(bits=9), r"2..8"),
    (dict(granularity="row"), "granularity='row' is unknown"),
    (dict(clip_ratio=0.0), r"clip_ratio=0.0 must be in \(0, 1\]"),
])
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    quant.weights(**kwargs)


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_mmjax_everything_rule_takes_every_leaf_of_its_models(preset):
  """mmjax's own configs quantize every parameter (QUANT_PATTERN = ".*"): each leaf of its
  models has at least two values per scale, so nothing is skipped and nothing warns (the
  published numbers rest on it)."""
  import warnings
  from mmjax.compress import Plan, flatten, rules
  from mmjax.models.family import QUANT_PATTERN
  from mmjax.models import MultimodalModel, get_preset, random_inputs
  cfg = get_preset(preset)
  shapes = {p: a for p, a in flatten(jax.eval_shape(lambda: MultimodalModel(cfg).init(
      jax.random.PRNGKey(0), random_inputs(cfg, 1))["params"])).items()}
  assert {a.ndim for a in shapes.values()} >= {1, 2}  # vectors too
  for granularity in quant.GRANULARITIES:
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      (entry,) = Plan(rules([(QUANT_PATTERN, quant.weights(8, granularity))])).check(
          shapes).entries(shapes)
    assert entry.paths == tuple(sorted(shapes)) and entry.skipped == ()


@pytest.mark.parametrize("shape, granularity, skipped", [
    ((), "channel", True), ((), "tensor", True), ((1,), "tensor", True),
    ((2,), "channel", False),  # a vector: per tensor, 2 values a scale
    ((1, 8), "channel", True), ((1, 8), "tensor", False), ((1, 1, 8), "channel", True),
    ((2, 8), "channel", False), ((0, 4), "channel", True),
])
def test_which_leaves_weights_accepts(shape, granularity, skipped):
  """Accepted exactly when every scale covers at least two values: then codes and scales
  are smaller than float32 (8-bit: 2 + 4 < 8 bytes for two values; 2-bit likewise)."""
  m = quant.weights(8, granularity)
  why = m.accepts("w", jax.ShapeDtypeStruct(shape, jnp.float32))
  assert (why is not None) == skipped, why
  assert m.accepts("w", jax.ShapeDtypeStruct((4, 4), jnp.int8)) == (
      "dtype int8 is not floating point")
  assert m.accepts("w", jax.ShapeDtypeStruct((4, 4), jnp.bfloat16)) is None
