"""Activation quantization by interception of the traced forward: calibration ranges,
fake-quant inputs, and the int8 x int8 -> int32 path matching the fake-quant model, for 2-D
Dense and for DenseGeneral kernels."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import Plan, activations, flatten, quant, rules
from mmjax.models.family import ACT_PATTERN, QUANT_PATTERN
from mmjax.models import MultimodalModel, get_preset, random_inputs


def _dense_kernels(params):
  return [p for p, w in flatten(params).items() if p.endswith("/kernel") and w.ndim == 2]


def _setup():
  cfg = get_preset("tiny")
  model = MultimodalModel(cfg)
  batches = [random_inputs(cfg, 4, seed=s) for s in range(3)]
  params = model.init(jax.random.PRNGKey(0), batches[0])["params"]
  return cfg, model, params, batches


def test_calibration_records_every_dense_input_range():
  cfg, model, params, batches = _setup()
  apply = lambda p, b: model.apply({"params": p}, b)
  amax = activations.calibrate(apply, params, batches, _dense_kernels(params))
  assert sorted(amax) == sorted(_dense_kernels(params))
  import re
  assert sorted(p for p in flatten(params) if re.fullmatch(ACT_PATTERN, p)) == sorted(amax)
  # the head's input is a LayerNorm output: its max over batches, checked by hand
  def head_input(b):
    _, inter = model.apply({"params": params}, b)
    return float(jnp.abs(inter["pooled"]).max())
  assert amax["head/kernel"] == pytest.approx(max(head_input(b) for b in batches), rel=1e-6)


def test_int8_path_matches_fake_quant_and_quantizes_for_real():
  cfg, model, params, batches = _setup()
  apply = lambda p, b: model.apply({"params": p}, b)
  scales = activations.scales_from_amax(activations.calibrate(apply, params, batches,
                                                              _dense_kernels(params)))
  plan = Plan(rules([(QUANT_PATTERN, quant.weights(8))], list(flatten(params))))
  view = plan.view(params, plan.init(params, jax.random.PRNGKey(0)))
  x = batches[1]

  def run(mode):
    return activations.apply_quantized(apply, scales, 8, mode)(view, x)[0]

  fake, real = np.asarray(jax.jit(lambda: run("fake"))()), np.asarray(jax.jit(
      lambda: run("int8"))())
  np.testing.assert_allclose(real, fake, rtol=1e-4, atol=1e-4)
  plain = np.asarray(model.apply({"params": view}, x)[0])
  assert np.abs(plain - fake).max() > 1e-5  # activation quantization did something
  hlo = jax.jit(lambda: run("int8")).lower().as_text()
  assert "i8" in hlo and "i32" in hlo  # an integer matmul is really in the program


def test_int8_matmul_gradient_is_straight_through():
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(5, 16)), jnp.float32)
  w = jnp.asarray(r.normal(size=(16, 8)), jnp.float32)
  s = jnp.float32(1.0 / 127)  # clip at |x| <= 1
  gx, gw = jax.grad(lambda x, w: activations.int8_matmul(x, w, s, False).sum(),
                    argnums=(0, 1))(x, w)
  inside = np.abs(np.asarray(x)) <= 1.0
  wq, ws = quant.quantize(w, 8)
  w_deq = np.asarray(wq, np.float32) * np.asarray(ws)
  np.testing.assert_allclose(np.asarray(gx), (np.ones((5, 8)) @ w_deq.T) * inside, rtol=1e-5,
                             atol=1e-5)
  x_deq = np.clip(np.round(np.asarray(x) / float(s)), -127, 127) * float(s)
  np.testing.assert_allclose(np.asarray(gw), x_deq.T @ np.ones((5, 8)), rtol=1e-5, atol=1e-5)


def test_int8_backward_matmuls_approximate_the_float_ones():
  """int8_grads: dX and dW come from int8 x int8 -> int32 products of the per-tensor
  quantized output gradient; they stay within int8 rounding of the float STE gradients
  (and are not those exactly: the integer path really ran)."""
  r = np.random.default_rng(1)
  x = jnp.asarray(r.normal(size=(3, 40, 64)), jnp.float32)
  w = jnp.asarray(r.normal(size=(64, 48)) / 8, jnp.float32)
  t = jnp.asarray(r.normal(size=(3, 40, 48)), jnp.float32)
  s = jnp.float32(3.0 / 127)  # some inputs clipped

  def grads(int8_grads):
    loss = lambda x, w: jnp.sum(jnp.sin(activations.int8_matmul(x, w, s, int8_grads)) * t)
    return jax.grad(loss, argnums=(0, 1))(x, w)

  (fx, fw), (ix, iw) = grads(False), grads(True)
  for f, i in ((fx, ix), (fw, iw)):
    f, i = np.asarray(f, np.float64), np.asarray(i, np.float64)
    rel = np.linalg.norm(i - f) / np.linalg.norm(f)
    assert 0 < rel < 0.02, rel
  assert (np.asarray(ix)[np.abs(np.asarray(x)) > 3.0] == 0).all()  # clipped: no gradient
  hlo = jax.jit(jax.grad(lambda x, w: activations.int8_matmul(x, w, s).sum(), argnums=(0, 1))
                ).lower(x, w).as_text()
  int_dots = [l for l in hlo.splitlines()
              if "dot_general" in l and "xi8>" in l and l.rstrip().endswith("xi32>")]
  assert len(int_dots) == 2  # dX and dW are integer products


class _Attention(nn.Module):
  """Flax's own attention (3-D DenseGeneral kernels) and a Dense head."""
  @nn.compact
  def __call__(self, x):
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(x)
    return nn.Dense(5, name="head")(x.mean(1))


def test_dense_general_products_int8_equal_fake_quant_and_are_integer():
  model = _Attention()
  r = np.random.default_rng(3)
  xs = [jnp.asarray(r.normal(size=(4, 6, 8)), jnp.float32) for _ in range(2)]
  params = model.init(jax.random.PRNGKey(0), xs[0])["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  paths = [p for p in flatten(params) if p.endswith("kernel")]
  assert {flatten(params)[p].ndim for p in paths} == {2, 3}
  scales = activations.scales_from_amax(activations.calibrate(apply, params, xs, paths))
  # the int8 path quantizes weights per output channel along the product's contraction:
  # compare with fake-quant inputs on weights fake-quantized the same way
  from mmjax.compress import layout
  wq = Plan(rules([(r".*kernel", quant.weights(8, contract=layout.FLAX_ATTENTION))]))
  view = wq.view(params, wq.init(params, None))
  fake = activations.apply_quantized(apply, scales, 8, "fake")(view, xs[1])
  real = jax.jit(activations.apply_quantized(apply, scales, 8, "int8"))(view, xs[1])
  np.testing.assert_allclose(np.asarray(real), np.asarray(fake), rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(fake) - np.asarray(apply(view, xs[1]))).max() > 1e-5
  hlo = jax.jit(activations.apply_quantized(apply, scales, 8, "int8")).lower(
      view, xs[1]).as_text()
  int_dots = [l for l in hlo.splitlines() if "dot_general" in l and "xi8>" in l]
  assert len(int_dots) == len(paths)  # every matched product ran on integers
  g = jax.grad(lambda p: jnp.sum(activations.apply_quantized(apply, scales, 8, "int8")(
      p, xs[1]) ** 2))(view)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
  assert float(jnp.abs(g["attn"]["query"]["kernel"]).sum()) > 0  # straight through


def test_a_rule_on_weights_no_matmul_consumes_is_an_error():
  cfg, model, params, batches = _setup()
  apply = lambda p, b: model.apply({"params": p}, b)
  with pytest.raises(ValueError, match="image/patch_embed/kernel.*consumed by no dot_general"):
    activations.calibrate(apply, params, batches[:1], ["image/patch_embed/kernel"])
