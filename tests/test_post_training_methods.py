"""The post-training methods as `Method`s on models mmjax did not write: calibration writes
new weights and grid/mask state that fine-tune like any other; sequential calibration
sees the compressed earlier blocks; statistics do not depend on the device count;
SmoothQuant's two product paths agree; bad settings fail before any work."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.compress import Plan, activations, flatten, formats, layout, pruning, rules, step
from mmjax.compress.post_training import gptq, obs, passes, rtn, smoothquant, sparsegpt, stats
from test_foreign_models import _loss_fn, _task, linen_model, nnx_model


def _err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _calibrated(plan, params, fwd, batches):
  p0, cs = plan.start(params, jax.random.PRNGKey(0))
  return plan.calibrate(fwd, p0, cs, batches)


@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_foreign_model_gptq_and_sparsegpt_then_fine_tune(name):
  """linen ViT (3-D attention kernels) gets GPTQ 3-bit, the NNX MLP SparseGPT 60%."""
  params, apply = linen_model() if name == "linen" else nnx_model()
  contract = layout.FLAX_ATTENTION if name == "linen" else None
  x, y = _task(512, seed=3)
  calib = [x[i:i + 64] for i in range(0, 256, 64)]
  held_out = x[256:]
  dense = apply(params, held_out)
  g3 = formats.grid("int", 3, granularity="channel")
  if name == "linen":
    method, baseline = gptq.method(g3, contract=contract), rtn.method(g3, contract=contract)
  else:
    method, baseline = sparsegpt.method(0.6), pruning.unstructured(0.6)
  plan = Plan(rules([(r".*kernel", method)]))
  params_c, cstate = _calibrated(plan, params, apply, calib)
  base_plan = Plan(rules([(r".*kernel", baseline)]))
  params_b, cstate_b = _calibrated(base_plan, params, apply, calib)
  assert _err(plan.apply(apply, params_c, cstate)(held_out), dense) < 0.9 * _err(
      base_plan.apply(apply, params_b, cstate_b)(held_out), dense)

  # an ordinary parameter tree + state: it fine-tunes, and stays on its grid / sparsity
  fwd = lambda p, b: (apply(p, b["x"]), {})
  steps = step.build(fwd, _loss_fn, optax.adam(1e-3), plan)
  state = steps.init(params_c, jax.random.PRNGKey(1), {"x": x[:2]})
  state = state.replace(cstate=cstate)
  train = jax.jit(steps.train_step)
  for i in range(3):
    state, _ = train(state, {"x": x[i * 32:(i + 1) * 32], "y": y[i * 32:(i + 1) * 32]}, None)
  view = flatten(plan.view(state.params, state.cstate))
  for path, w in view.items():
    if not path.endswith("kernel"):
      continue
    w = np.asarray(w)
    if name == "linen":  # <= 2**3 - 1 levels per output channel of the matrix view
      m = np.asarray(layout.to_matrix(jnp.asarray(w), layout.contract_axes(contract, path,
                                                                          w.ndim)))
      assert max(len(np.unique(c)) for c in m.T) <= 7, path
    else:
      mask = np.asarray(state.cstate[method.name][path]["mask"])
      assert (w[~mask] == 0).all() and abs((~mask).mean() - 0.6) < 0.02, path


def _two_blocks():
  r = np.random.default_rng(0)
  params = {f"block_{i}": {"w": jnp.asarray(r.normal(size=(32, 32)) / 5, jnp.float32)}
            for i in range(2)}
  params["head"] = jnp.asarray(r.normal(size=(32, 8)) / 5, jnp.float32)

  def apply(p, x):
    h = jnp.tanh(x @ p["block_0"]["w"])
    h = jnp.tanh(h @ p["block_1"]["w"])
    return h @ p["head"]
  mix = r.normal(size=(32, 32))
  batches = [jnp.asarray(r.normal(size=(64, 32)) @ mix, jnp.float32) for _ in range(2)]
  return params, apply, batches


def test_sequential_statistics_come_from_the_compressed_earlier_blocks():
  params, apply, batches = _two_blocks()
  grid = formats.grid("int", 3, granularity="group", group_size=16)
  seq = Plan(rules([(r"block_\d/w", gptq.method(grid))]))
  par = Plan(rules([(r"block_\d/w", gptq.method(grid, mode="parallel"))]))
  p_seq, _ = _calibrated(seq, params, apply, batches)
  p_par, _ = _calibrated(par, params, apply, batches)
  # block 0 sees the same (dense) inputs either way; block 1 does not
  np.testing.assert_array_equal(p_seq["block_0"]["w"], p_par["block_0"]["w"])
  # by hand: block 1's Hessian from the model whose block 0 is already quantized
  x = jnp.concatenate(batches)
  h1 = jnp.tanh(x @ p_seq["block_0"]["w"])
  want = obs.solve(params["block_1"]["w"], h1.T @ h1, grid=grid).w
  np.testing.assert_allclose(p_seq["block_1"]["w"], want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(p_seq["block_1"]["w"], p_par["block_1"]["w"])
  assert stats.STATS  # the statistics the methods may ask for
  order = [p for blk in passes.blocks(["block_1/w", "block_0/w", "head"]) for p in blk]
  assert order == ["block_1/w", "block_0/w", "head"]  # first-use order, kept


def test_independent_towers_share_a_pass_and_keep_the_block_by_block_weights():
  """Two towers of two blocks and a join: the towers' blocks are solved level by level
  (a0 with b0, a1 with b1, then the join), and each block's weights are exactly those of
  block-by-block calibration, computed here by hand from the compressed earlier blocks."""
  r = np.random.default_rng(1)
  w = lambda: jnp.asarray(r.normal(size=(32, 32)) / 5, jnp.float32)
  params = {"a": {"block_0": {"w": w()}, "block_1": {"w": w()}},
            "b": {"block_0": {"w": w()}, "block_1": {"w": w()}}, "join": {"w": w()}}

  def apply(p, x):
    ha = jnp.tanh(jnp.tanh(x @ p["a"]["block_0"]["w"]) @ p["a"]["block_1"]["w"])
    hb = jnp.tanh(jnp.tanh(x[:, ::-1] @ p["b"]["block_0"]["w"]) @ p["b"]["block_1"]["w"])
    return jax.jit(lambda h: h @ p["join"]["w"])(ha * hb)  # through a nested jit
  mix = r.normal(size=(32, 32))
  batches = [jnp.asarray(r.normal(size=(64, 32)) @ mix, jnp.float32) for _ in range(2)]
  paths = ["a/block_0/w", "a/block_1/w", "b/block_0/w", "b/block_1/w", "join/w"]
  deps = passes.dependencies(apply, params, batches[0], paths)
  assert list(deps) == paths  # the order the forward first uses them
  assert deps["a/block_1/w"] == {"a/block_0/w"} and deps["b/block_0/w"] == set()
  assert deps["join/w"] == set(paths[:4])
  assert passes.levels(passes.blocks(paths), deps) == [
      ["a/block_0/w", "b/block_0/w"], ["a/block_1/w", "b/block_1/w"], ["join/w"]]
  # a block that depends on one the forward uses later: one block per level, in order
  assert passes.levels([["x"], ["y"]], {"x": {"y"}}) == [["x"], ["y"]]

  grid = formats.grid("int", 3, granularity="group", group_size=16)
  got, _ = _calibrated(Plan(rules([(r".*w", gptq.method(grid))])), params, apply, batches)
  x = jnp.concatenate(batches)
  solve = lambda w, h: obs.solve(w, h.T @ h, grid=grid).w
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for t, xin in (("a", x), ("b", x[:, ::-1])):
    close(got[t]["block_0"]["w"], solve(params[t]["block_0"]["w"], xin))
    h = jnp.tanh(xin @ got[t]["block_0"]["w"])
    close(got[t]["block_1"]["w"], solve(params[t]["block_1"]["w"], h))
  hj = (jnp.tanh(jnp.tanh(x @ got["a"]["block_0"]["w"]) @ got["a"]["block_1"]["w"]) *
        jnp.tanh(jnp.tanh(x[:, ::-1] @ got["b"]["block_0"]["w"]) @ got["b"]["block_1"]["w"]))
  close(got["join"]["w"], solve(params["join"]["w"], hj))


def test_mmjax_towers_are_calibrated_together():
  """On mmjax's own model the three towers' blocks share levels; the fusion comes after."""
  from mmjax.models import MultimodalModel, get_preset, random_inputs
  from mmjax.models.family import PRUNE_PATTERN
  import re
  cfg = get_preset("tiny")
  model = MultimodalModel(cfg)
  batch = random_inputs(cfg, 2)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch)["params"])
  apply = lambda p, b: model.apply({"params": p}, b)
  paths = [p for p in flatten(params) if re.fullmatch(PRUNE_PATTERN, p)]
  groups, lv = passes.solve_order(apply, params, batch, paths)
  prefixes = [sorted({"/".join(p.split("/")[:2]) for p in level}) for level in lv]
  assert prefixes == [["audio/block_00", "image/block_00", "text/block_00"],
                      ["fusion/layer_00"]], prefixes
  assert len(groups) == 4 and sorted(p for level in lv for p in level) == sorted(paths)


def test_statistics_do_not_depend_on_the_device_count(cpu_devices):
  params, apply, batches = _two_blocks()
  paths = ["block_0/w", "block_1/w", "head"]
  want, _ = stats.collect(apply, params, batches, paths, stats.STATS)
  mesh = Mesh(np.array(cpu_devices), ("data",))
  sharded = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
  got, _ = stats.collect(apply, params, sharded, paths, stats.STATS)
  for p in paths:
    for k in want[p]:
      np.testing.assert_allclose(got[p][k], want[p][k], rtol=2e-5, atol=1e-4)
  x = np.concatenate([np.asarray(b) for b in batches]).astype(np.float64)  # the reference
  np.testing.assert_allclose(want["block_0/w"]["gram"], x.T @ x, rtol=1e-5)
  np.testing.assert_allclose(want["block_0/w"]["absmean"], np.abs(x).mean(0), rtol=1e-5)
  np.testing.assert_allclose(want["block_0/w"]["amax"], np.abs(x).max(0), rtol=1e-6)


def test_smoothquant_moves_outliers_and_its_int8_path_computes_the_fake_one():
  r = np.random.default_rng(4)
  w = r.normal(size=(64, 32)) / 8
  w[:4] /= 40.0  # the outlier channels' weights are small: every channel matters
  params = {"fc": {"kernel": jnp.asarray(w, jnp.float32)}}
  apply = lambda p, x: x @ p["fc"]["kernel"]

  def inputs(n, seed):
    x = np.random.default_rng(seed).normal(size=(n, 64))
    x[:, :4] *= 40.0  # a few outlier channels, as in transformer activations
    return jnp.asarray(x, jnp.float32)
  calib, test_x = [inputs(128, 5)], inputs(256, 6)
  dense = apply(params, test_x)
  errs, outs = {}, {}
  for name, plan in {
      "rtn": Plan(rules([(r".*", rtn.method(formats.grid("int", 8)))]),
                  rules([(r".*", activations.inputs(8))])),
      "sq_fake": Plan(rules([(r".*", smoothquant.method(0.5))])),
      "sq_int8": Plan(rules([(r".*", smoothquant.method(0.5, mode="int8"))]))}.items():
    p, cs = _calibrated(plan, params, apply, calib)
    outs[name] = plan.apply(apply, p, cs)(test_x)
    errs[name] = _err(outs[name], dense)
  assert errs["sq_fake"] < 0.5 * errs["rtn"], errs
  np.testing.assert_allclose(outs["sq_int8"], outs["sq_fake"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make, needle", [
    (lambda: formats.grid("int", 9), "bits in 2..8"),
    (lambda: formats.grid("int", 1), "bits in 2..8"),
    (lambda: formats.grid("fp7"), "unknown"),
    (lambda: Plan(rules([(r".*", gptq.method(formats.grid(
        "int", 4, granularity="group", group_size=48)))])).check({"w": (64, 8)}),
     "group_size=48 does not divide the contraction dimension 64"),
    (lambda: sparsegpt.method(n_m=(4, 2)), "1 <= N < M"),
    (lambda: gptq.method(formats.grid("int", 4), damp=0.0), "damping"),
    (lambda: smoothquant.method(1.5), "alpha"),
])
def test_bad_settings_fail_at_construction(make, needle):
  with pytest.raises(ValueError, match=needle):
    make()


def test_a_hessian_singular_after_damping_names_the_layer():
  r = np.random.default_rng(0)
  params = {"w": jnp.asarray(r.normal(size=(16, 8)), jnp.float32)}
  apply = lambda p, x: x @ p["w"]
  bad = jnp.asarray(r.normal(size=(32, 16)), jnp.float32).at[0, 0].set(jnp.inf)
  plan = Plan(rules([(r"w", gptq.method(formats.grid("int", 4, granularity="channel")))]))
  with pytest.raises(ValueError, match=r"Hessian of w .*raise the damping"):
    _calibrated(plan, params, apply, [bad])
