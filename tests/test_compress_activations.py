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


# ----------------------------------------------- uncalibrated activation scales

def _plain():
  """A hand-made params dict and its forward: three matmuls, one through a nested jit."""
  r = np.random.default_rng(1)
  params = {"w1": jnp.asarray(r.normal(size=(16, 64)) / 4, jnp.float32),
            "b1": jnp.asarray(r.normal(size=(64,)) / 10, jnp.float32),
            "w2": jnp.asarray(r.normal(size=(64, 32)) / 8, jnp.float32),
            "out": {"w": jnp.asarray(r.normal(size=(32, 4)) / 6, jnp.float32)}}

  def apply(p, x):
    h = jax.nn.relu(jnp.dot(x, p["w1"]) + p["b1"])
    h = jax.nn.relu(jnp.einsum("bi,io->bo", h, p["w2"]))
    return h @ p["out"]["w"]
  return params, apply


def _reference(params, x, scales=None, int8_weights=False):
  """float64 NumPy: each product's input fake-quantized to int8 per tensor with `scales`,
  or, without them, with its own batch's max|x| / 127; int8 weights per output channel."""
  def fq(a, s):
    return np.clip(np.round(a / s), -127, 127) * s

  def w(a):
    a = np.asarray(a, np.float64)
    return fq(a, np.maximum(np.abs(a).max(axis=0, keepdims=True), 1e-30) / 127) if (
        int8_weights) else a

  def q(a, path):
    s = scales[path] if scales is not None else max(np.abs(a).max(), 1e-8) / 127
    return fq(a, np.float64(s))

  x = np.asarray(x, np.float64)
  h = np.maximum(q(x, "w1") @ w(params["w1"]) + np.asarray(params["b1"], np.float64), 0)
  h = np.maximum(q(h, "w2") @ w(params["w2"]), 0)
  return q(h, "out/w") @ w(params["out"]["w"])


def _xs(n=3, seed=4):
  r = np.random.default_rng(seed)
  return [jnp.asarray(r.normal(size=(32, 16)) * (1 + i), jnp.float32) for i in range(n)]


@pytest.mark.parametrize("mode", activations.MODES)
def test_an_uncalibrated_plan_in_an_optax_loop_quantizes_each_batch_by_its_own_range(
    mode, tmp_path):
  """The README loop with int8 activations and no plan.calibrate: init says so; eagerly
  (the state concrete), the forward, describe and export refuse ("calibrate first"); inside
  jit each product's input is quantized with its own batch's range, as a float64 per-batch
  reference computes, and the loop trains."""
  import optax
  from mmjax.compress import export, storage
  params, apply_fn = _plain()
  xs = _xs()
  plan = Plan(rules([(r"w1|w2|out/w", activations.inputs(8, mode))]))
  with pytest.warns(UserWarning, match=rf"'act8_{mode}': the input scales of 3 layers are "
                    r"not calibrated; call plan\.calibrate\(apply_fn, params, cstate, "):
    params, cstate = plan.start(params, jax.random.key(0))
  refuse = r"calibrate first: call plan\.calibrate\(apply_fn, params, cstate, batches\)"
  with pytest.raises(ValueError, match=refuse):
    plan.apply(apply_fn, params, cstate)(xs[0])
  with pytest.raises(ValueError, match=refuse):
    plan.describe(params, cstate)
  with pytest.raises(ValueError, match=refuse):
    export.export(params, str(tmp_path / "export"), plan, cstate)
  with pytest.raises(ValueError, match=r"export: the input scale of w1 is not calibrated"):
    export.export(params, str(tmp_path / "export"), plan, cstate,
                  info={"w1": storage.Stored(act=storage.ActScale(np.float32(0.0), 8))})

  forward = jax.jit(lambda p, c, x: plan.apply(apply_fn, p, c)(x))
  for x in xs:
    np.testing.assert_allclose(np.asarray(forward(params, cstate, x)),
                               _reference(params, x, int8_weights=mode == "int8"),
                               rtol=1e-5, atol=1e-5)
  y = np.asarray(forward(params, cstate, xs[0]))  # not the old placeholder scale 1.0
  assert np.abs(y - _reference(params, xs[0], {p: 1.0 for p in ("w1", "w2", "out/w")},
                               mode == "int8")).max() > 1e-2

  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  target = jnp.asarray(np.random.default_rng(5).normal(size=(32, 4)), jnp.float32)
  loss = lambda out: jnp.mean((out - target) ** 2)

  @jax.jit
  def train_step(params, opt_state, cstate, step):
    grads = jax.grad(lambda p: loss(plan.apply(apply_fn, p, cstate)(xs[0])))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params, cstate = plan.update(params, cstate, step)
    return params, opt_state, cstate

  first = float(loss(forward(params, cstate, xs[0])))
  for s in range(1, 21):
    params, opt_state, cstate = train_step(params, opt_state, cstate, s)
  assert float(loss(forward(params, cstate, xs[0]))) < first


@pytest.mark.parametrize("mode", activations.MODES)
def test_a_calibrated_plan_runs_exactly_the_calibrated_scales(mode):
  """After plan.calibrate: the state has the structure init gave (what a trainer's
  eval_shape, checkpoints and restores rely on), and the jitted forward with the state
  traced, its gradient, and the eager forward equal, bit for bit, the forward with the
  scales fixed in the program (`apply_quantized`, the path the export serves), which
  equals the float64 reference with the calibrated scales."""
  params, apply_fn = _plain()
  xs = _xs()
  plan = Plan(rules([(r"w1|w2|out/w", activations.inputs(8, mode))]))
  with pytest.warns(UserWarning, match="not calibrated"):
    params, cstate = plan.start(params, jax.random.key(0))
    abstract = jax.eval_shape(plan.init, params, jax.random.key(0))
  params, cal = plan.calibrate(apply_fn, params, cstate, xs[:2])
  assert jax.tree.structure(cal) == jax.tree.structure(abstract)
  assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == [
      (jnp.shape(a), jnp.asarray(a).dtype) for a in jax.tree.leaves(cal)]
  scales = cal[f"act8_{mode}"]
  assert all(float(s) > 0 for s in scales.values())
  fixed = jax.jit(activations.apply_quantized(apply_fn, scales, 8, mode))
  traced = jax.jit(lambda p, c, x: plan.apply(apply_fn, p, c)(x))
  for x in xs:
    want = np.asarray(fixed(params, x))
    np.testing.assert_array_equal(np.asarray(traced(params, cal, x)), want)
    np.testing.assert_allclose(np.asarray(plan.apply(apply_fn, params, cal)(x)), want,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(want, _reference(params, x, {p: float(s) for p, s in
                                                            scales.items()}, mode == "int8"),
                               rtol=1e-5, atol=1e-5)
  grad = lambda f: jax.jit(jax.grad(lambda p: jnp.sum(f(p) ** 2)))(params)
  for g, h in zip(jax.tree.leaves(grad(lambda p: plan.apply(apply_fn, p, cal)(xs[2]))),
                  jax.tree.leaves(grad(lambda p: activations.apply_quantized(
                      apply_fn, scales, 8, mode)(p, xs[2])))):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(h))
  info = plan.describe(params, cal)
  assert {p: float(d.act.scale) for p, d in info.items()} == {
      p: float(s) for p, s in scales.items()}


def test_a_state_saved_before_the_uncalibrated_marker_restores_and_runs(tmp_path):
  """A compression state written before init marked scales as uncalibrated (0.0) has the
  same structure ({method: {path: float32 scale}}), so a trainer's abstract state restores
  it, and its calibrated scales are used as they are."""
  import orbax.checkpoint as ocp
  params, apply_fn = _plain()
  xs = _xs()
  plan = Plan(rules([(r"w1|w2|out/w", activations.inputs(8))]))
  old = {"act8_fake": {"w1": np.float32(0.031), "w2": np.float32(0.017),
                       "out/w": np.float32(0.012)}}  # as the old calibrate wrote them
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "cstate"), old)
  with pytest.warns(UserWarning, match="not calibrated"):
    abstract = jax.eval_shape(plan.init, params, jax.random.key(0))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(str(tmp_path / "cstate"), abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(abstract)
  got = jax.jit(lambda p, c, x: plan.apply(apply_fn, p, c)(x))(params, restored, xs[0])
  want = jax.jit(activations.apply_quantized(apply_fn, old["act8_fake"]))(params, xs[0])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_compressed_train_step_with_a_learned_loss_part_starts_uncalibrated():
  """`step.build(...).init` sizes the loss stages' parameters on a forward of the sample
  batch; with activation scales not calibrated yet that forward runs jitted (each input at
  its own range), not eagerly (where the state would be refused)."""
  import optax
  from mmjax.compress import distill, step
  params, apply = _plain()
  fwd = lambda p, b: (apply(p, b["x"]), {"h": jnp.dot(b["x"], p["w1"])})
  plan = Plan(rules([(r"w1|w2|out/w", activations.inputs(8))]),
              distill.method(fwd, features=("h",), feature_weight=1.0))
  steps = step.build(fwd, lambda out, b: (jnp.mean(out ** 2), {}), optax.sgd(0.1), plan)
  with pytest.warns(UserWarning, match="not calibrated"):
    state = steps.init(params, jax.random.PRNGKey(0), {"x": _xs(1)[0]}, {"distill": params})
  assert state.aux == {"distill": {}}  # same widths: no projection, but sized on a forward
