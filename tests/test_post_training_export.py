"""Post-training grids exported for real: 4-bit codes two per byte, group scales, zero
points, fp8 bytes, NF4 indices, AWQ's per-input scales, SparseGPT's masks; the loader
rebuilds exactly the view the plan computes with, the bytes on disk shrink as the bits
say, and the int4 weight-only path (codes unpacked inside the jitted program) gives the
fake-quant view's logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import Plan, export, flatten, formats, lowbit, rules, unflatten
from mmjax.compress.post_training import awq, gptq, rtn, sparsegpt


def _model():
  r = np.random.default_rng(0)
  params = {"block_0": {"w": jnp.asarray(r.normal(size=(128, 256)) / 11, jnp.float32),
                        "b": jnp.zeros((256,))},
            "block_1": {"w": jnp.asarray(r.normal(size=(256, 64)) / 16, jnp.float32)}}

  def apply(p, x):
    h = jax.nn.gelu(x @ p["block_0"]["w"] + p["block_0"]["b"])
    return h @ p["block_1"]["w"]
  batches = [jnp.asarray(r.normal(size=(64, 128)), jnp.float32) for _ in range(2)]
  return params, apply, batches


G = formats.grid
METHODS = {
    "gptq_w4g64": lambda: gptq.method(G("int", 4, granularity="group", group_size=64)),
    "gptq_w3g32_asym": lambda: gptq.method(G("int", 3, symmetric=False, granularity="group",
                                             group_size=32)),
    "awq_w4c": lambda: awq.method(G("int", 4), n_grid=4),
    "rtn_nf4g64": lambda: rtn.method(G("nf4", granularity="group", group_size=64)),
    "rtn_fp8": lambda: rtn.method(G("fp8_e4m3")),
    "sparsegpt_2of4_w4": lambda: sparsegpt.method(n_m=(2, 4), grid=G("int", 4)),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_rebuilds_the_view_exactly(name, tmp_path):
  params, apply, batches = _model()
  plan = Plan(rules([(r"block_\d/w", METHODS[name]())]))
  p, cs = plan.start(params, jax.random.PRNGKey(0))
  p, cs = plan.calibrate(apply, p, cs, batches)
  view = flatten(jax.jit(plan.view)(p, cs))
  out = str(tmp_path / "e")
  export.export(p, out, plan, cs, zstd=False)
  loaded = flatten(export.load(out))
  for path in view:
    np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(view[path]), path)
  bits = {"rtn_fp8": 8, "gptq_w3g32_asym": 3}.get(name, 4)
  kernels = 128 * 256 + 256 * 64
  coded = kernels * bits / 8 * (0.5 if "2of4" in name else 1)
  size = export.disk_bytes(out)
  dense = 4 * (kernels + 256)
  assert size < coded + 4 * 256 + 0.2 * kernels + 40_000, (size, coded)  # + scales, index
  assert size < dense / (3.0 if bits == 8 else 4.0)


def test_int4_weight_only_path_gives_the_views_logits(tmp_path):
  params, apply, batches = _model()
  plan = Plan(rules([(r"block_\d/w", gptq.method(G("int", 4, granularity="group",
                                                   group_size=64)))]))
  p, cs = plan.start(params, jax.random.PRNGKey(0))
  p, cs = plan.calibrate(apply, p, cs, batches)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(16, 128)), jnp.float32)
  want = plan.apply(apply, p, cs)(x)
  out = str(tmp_path / "e")
  export.export(p, out, plan, cs)
  codes = export.load_grid_codes(out)
  assert {c["packed"].dtype for c in codes.values()} == {np.dtype(np.uint8)}
  assert sum(c["packed"].size for c in codes.values()) == (128 * 256 + 256 * 64) // 2
  arrays, _ = lowbit.split(codes)
  rest = lowbit.placeholders(flatten(export.load(out)), codes)
  served = jax.jit(lowbit.weight_only(apply, codes))
  got = served(unflatten(rest), arrays, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  hlo = served.lower(unflatten(rest), arrays, x).as_text()
  assert "xui8>" in hlo  # the program takes the packed bytes


def test_smoothquant_weights_export_exactly(tmp_path):
  from mmjax.compress.post_training import smoothquant
  params, apply, batches = _model()
  plan = Plan(rules([(r"block_\d/w", smoothquant.method(0.5))]))
  p, cs = plan.start(params, jax.random.PRNGKey(0))
  p, cs = plan.calibrate(apply, p, cs, batches)
  export.export(p, str(tmp_path / "e"), plan, cs)
  loaded, view = flatten(export.load(str(tmp_path / "e"))), flatten(plan.view(p, cs))
  for path in ("block_0/w", "block_1/w"):
    np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(view[path]))
