"""Stacked layers under `nn.scan` (and `nn.remat` inside it) compress as their unrolled twin
(`scan_zoo`): the same weights, calibrated through the public API, give the same
compressed weights and state (unstacked) and the same outputs.

The scanned model is calibrated with its scan unrolled (`unroll`), each layer's statistics
from the forward through the already compressed layers before it (sequential mode), then
solved by the same jitted solvers on the same shapes. The two calibration forwards are
different XLA programs, so their statistics may differ in the last float32 bit: weights and
state are compared to 1e-6 (a rounding decision flipped by such a difference would move a
weight by a whole grid step and fail), masks exactly. Observed on CPU: GPTQ, SparseGPT,
Wanda, int8 weights and int8 activation scales bit-identical, AWQ within one ulp (its
input scales divide back out). Outputs are compared to float32 rounding."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scan_zoo import make, unstack
from mmjax.compress import Plan, activations, flatten, formats, layout, pruning, quant, rules
from mmjax.compress.post_training import awq, gptq, rtn, smoothquant, sparsegpt, wanda

STACKED = {r"blocks/.*": layout.stacked(layout.FLAX_ATTENTION)}
G4 = formats.grid("int", 4, granularity="channel")
G3_GROUPS = formats.grid("int", 3, granularity="group", group_size=8)

METHODS = {
    "gptq4": lambda c: gptq.method(G4, contract=c),
    "gptq3_groups": lambda c: gptq.method(G3_GROUPS, contract=c),
    "sparsegpt50": lambda c: sparsegpt.method(0.5, contract=c),
    # the sequential machinery is shared by every method: these two run it in parallel mode
    "wanda50": lambda c: wanda.method(0.5, contract=c, mode="parallel"),
    "awq4": lambda c: awq.method(G4, n_grid=4, contract=c, mode="parallel"),
    "int8_acts": lambda c: activations.inputs(8, "int8"),
    "smoothquant": lambda c: smoothquant.method(0.5, mode="int8", contract=c),
    "int8_weights": lambda c: quant.weights(8, contract=c),
    "rtn3": lambda c: rtn.method(formats.grid("int", 3), contract=c),
    "nm24": lambda c: pruning.n_of_m(2, 4, contract=c),
}


def _compress(method, params, apply, batches, rule=r".*kernel"):
  plan = Plan(rules([(rule, method)]))
  p0, cs = plan.start(params, jax.random.PRNGKey(0))
  p1, cs = plan.calibrate(apply, p0, cs, batches)
  return plan, p1, cs


def _rules(name):
  """GPTQ takes every kernel (stacked and not, in one method); the others the blocks' only
  (fewer levels to compile)."""
  return (r".*kernel", r".*kernel") if name == "gptq4" else (r"blocks/.*kernel",
                                                             r"block_\d/.*kernel")


@functools.lru_cache(maxsize=None)
def _twin(name):
  params, _, apply_t, batches = make()
  return _compress(METHODS[name](layout.FLAX_ATTENTION), unstack(params), apply_t, batches,
                   _rules(name)[1])


def _close(a, b, what):
  a, b = np.asarray(a), np.asarray(b)
  if a.dtype == bool:
    np.testing.assert_array_equal(a, b, err_msg=what)
  else:
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=what)


@pytest.mark.parametrize("name,remat", [(n, True) for n in sorted(METHODS) if n != "gptq3_groups"]
                         + [("gptq3_groups", False), ("int8_acts", False)])
def test_stacked_layers_compress_as_their_unrolled_twin(name, remat):
  params, apply_s, apply_t, batches = make(remat)
  plan_s, got, cs_s = _compress(METHODS[name](STACKED), params, apply_s, batches,
                                _rules(name)[0])
  plan_t, want, cs_t = _twin(name)
  got_f, want_f = flatten(unstack(got)), flatten(want)
  for p in want_f:
    _close(got_f[p], want_f[p], p)
  # the per-layer state (grid scales, masks, AWQ's input scales, activation scales) too
  method = plan_s.entries(flatten(params))[0].method.name
  view_s = flatten(unstack(jax.jit(plan_s.view)(got, cs_s)))
  view_t = flatten(jax.jit(plan_t.view)(want, cs_t))
  for p in want_f:
    _close(view_s[p], view_t[p], p)
  masks = {p: s["mask"] for p, s in cs_s[method].items()
           if p.startswith("blocks/") and isinstance(s, dict) and "mask" in s}
  for p, m in masks.items():
    for i in range(3):
      _close(m[i], cs_t[method][p.replace("blocks", f"block_{i}")]["mask"], p)
  if name == "int8_acts":
    for i in range(3):
      for p, s in cs_s[method].items():
        if p.startswith("blocks/"):
          assert float(s[i]) == float(cs_t[method][p.replace("blocks", f"block_{i}")]), p
  if name == "smoothquant":
    st = cs_s[method]["blocks/Dense_1/kernel"]
    assert st["smooth"].shape == (3, 32) and st["act_scale"].shape == (3,)
    for i in range(3):
      for k in ("smooth", "act_scale"):
        _close(st[k][i], cs_t[method][f"block_{i}/Dense_1/kernel"][k], k)
  if name == "awq4":
    s = cs_s[method]["blocks/Dense_0/kernel"]["in_scale"]
    assert s.shape == (3, 16)
    for i in range(3):
      _close(s[i], cs_t[method][f"block_{i}/Dense_0/kernel"]["in_scale"], "in_scale")
  changed = [p for p, w in flatten(params).items() if p.startswith("blocks/")
             and p.endswith("kernel") and not np.array_equal(w, flatten(got)[p])]
  assert changed or name in ("int8_acts", "int8_weights", "smoothquant")
  if name == "nm24":  # 2 of every 4 inputs kept, per output, in each layer
    kept = np.asarray(flatten(got)["blocks/Dense_0/kernel"] != 0).reshape(3, 4, 4, 32)
    assert (kept.sum(axis=2) == 2).all()
  if name not in ("gptq4", "int8_acts", "smoothquant"):
    return  # equal weights and views give equal outputs; these three rewrite the forward
  x = batches[0]
  y_s = jax.jit(plan_s.apply(apply_s, got, cs_s))(x)
  y_t = jax.jit(plan_t.apply(apply_t, want, cs_t))(x)
  np.testing.assert_allclose(y_s, y_t, rtol=1e-5, atol=1e-5)
  if name in ("int8_acts", "smoothquant"):  # the model keeps its scan (per-layer scales)
    prims = str(jax.make_jaxpr(plan_s.apply(apply_s, got, cs_s))(x))
    assert "scan[" in prims


def _fake_quant_np(w, axes, bits=8):
  w = np.asarray(w, np.float64)
  qm = 2 ** (bits - 1) - 1
  s = np.maximum(np.abs(w).max(axis=axes, keepdims=True), 1e-30) / qm
  return np.clip(np.round(w / s), -qm, qm) * s, s


def test_flax_attention_contracts_the_input_axis_of_stacked_kernels():
  """The old silent failure: `FLAX_ATTENTION` contracted axis 0, the depth axis, of a
  stacked query kernel [depth, in, heads, head_dim]. Now its scales are per layer and per
  output feature, as a float64 NumPy reference computed layer by layer gives."""
  params, *_ = make()
  flat = flatten(params)
  q = "blocks/MultiHeadDotProductAttention_0/query/kernel"
  o = "blocks/MultiHeadDotProductAttention_0/out/kernel"
  assert layout.contract_axes(layout.FLAX_ATTENTION, q, 4) == (1,)
  assert layout.contract_axes(layout.FLAX_ATTENTION, o, 4) == (1, 2)
  for spec in (layout.FLAX_ATTENTION, STACKED):
    plan = Plan(rules([(r"blocks/.*/(query|out)/kernel", quant.weights(8, contract=spec))]))
    p0, cs = plan.start(params, jax.random.PRNGKey(0))
    view, info = flatten(plan.view(p0, cs)), plan.describe(p0, cs)
    for path, layer_axes in ((q, (0,)), (o, (0, 1))):
      w = np.asarray(flat[path], np.float64)
      assert info[path].codes.contract == tuple(a + 1 for a in layer_axes)
      for i in range(w.shape[0]):  # layer by layer: scales never shared across depth
        ref, _ = _fake_quant_np(w[i], layer_axes)
        np.testing.assert_allclose(np.asarray(view[path][i], np.float64), ref, rtol=0,
                                   atol=1e-7)


def test_stacked_dense_kernels_get_per_layer_scales_per_channel_and_per_tensor():
  params, *_ = make()
  w = np.asarray(flatten(params)["blocks/Dense_0/kernel"], np.float64)  # [3, 16, 32]
  for gran, layer_axes in (("channel", (0,)), ("tensor", (0, 1))):
    plan = Plan(rules([(r"blocks/Dense_0/kernel",
                        quant.weights(4, gran, contract=layout.stacked(None)))]))
    p0, cs = plan.start(params, jax.random.PRNGKey(0))
    got = np.asarray(flatten(plan.view(p0, cs))["blocks/Dense_0/kernel"], np.float64)
    for i in range(3):
      np.testing.assert_allclose(got[i], _fake_quant_np(w[i], layer_axes, 4)[0], atol=1e-7)


def test_unstacked_axes_resolve_as_before():
  for path, ndim, axes in (("a/query/kernel", 3, (0,)), ("a/out/kernel", 3, (0, 1)),
                           ("a/fc/kernel", 2, (0,)), ("conv/kernel", 4, (0, 1, 2))):
    assert layout.contract_axes(layout.FLAX_ATTENTION, path, ndim) == axes
  assert layout.contract_axes((-2,), "x", 3) == (1,)
  assert layout.depth_axes(layout.FLAX_ATTENTION, "a/query/kernel") == 0


@pytest.mark.parametrize("spec,shape,match", [
    (layout.stacked((0, 1, 2)), (3, 16, 2, 8), r"do not fit q of shape \(3, 16, 2, 8\) "
     r"\(each layer's kernel, after 1 stack axes, is \(16, 2, 8\)\)"),
    (layout.stacked((3,)), (3, 16, 2, 8), "do not fit q"),
    (layout.stacked(None, 4), (3, 16, 2, 8), "has no axes left after the 4 stack axes"),
    (layout.FLAX_ATTENTION, (16, 8), r"\(-3,\) do not fit a/query/kernel"),
])
def test_layout_check_rejects_inconsistent_specs(spec, shape, match):
  with pytest.raises(ValueError, match=match):
    layout.check(spec, {"q": shape} if spec != layout.FLAX_ATTENTION else
                 {"a/query/kernel": shape}, "quantization")
  with pytest.raises(ValueError, match="must be a positive integer"):
    layout.stacked(None, 0)


def test_an_undeclared_stack_is_an_error_naming_the_fix():
  """A calibrating method sees the scan slice the kernel: a spec that does not declare the
  stack (it would contract or share scales across depth) is refused, and the spec the
  message gives works."""
  params, apply_s, _, batches = make()
  with pytest.raises(ValueError, match=r"blocks/Dense_0/kernel \(and 5 more\) of shape "
                     r"\(3, 16, 32\) is stacked \(a scan slices its axis 0 into 3 layers\) "
                     r"but the layout spec treats it as one kernel .* pass contract=") as e:
    _compress(gptq.method(G4), params, apply_s, batches[:1])
  rx = re.search(r"contract=\{r'([^']+)': layout.stacked\(None\)\}", str(e.value)).group(1)
  with pytest.raises(ValueError, match="layout.stacked\\(layout.FLAX_ATTENTION\\), "
                     "\\*\\*layout.FLAX_ATTENTION"):
    _compress(gptq.method(G4, contract=layout.FLAX_ATTENTION), params, apply_s, batches[:1])
  fixed = {rx: layout.stacked(layout.FLAX_ATTENTION), **layout.FLAX_ATTENTION}
  _, got, _ = _compress(gptq.method(G4, contract=fixed), params, apply_s, batches[:1])
  assert not np.array_equal(flatten(got)["blocks/Dense_0/kernel"],
                            flatten(params)["blocks/Dense_0/kernel"])


def test_what_is_not_supported_is_named():
  # a stacked weight indexed inside a while loop (not a scan's per-layer input)
  w = jnp.ones((3, 4, 4))

  def loop(p, x):
    body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["kernel"][c[0]]))
    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

  with pytest.raises(ValueError, match=r"kernel \(and 0 more\) is consumed by no dot_general "
                     r".*read by 1 while"):
    _compress(gptq.method(G4, contract=layout.stacked(None)), {"kernel": w}, loop,
              [jnp.ones((2, 4))])

  def nested(p, x):  # an inner scan over each layer's [2, 4, 4] slice
    inner = lambda h, w: (jnp.tanh(h @ w), None)
    return jax.lax.scan(lambda h, ws: (jax.lax.scan(inner, h, ws)[0], None), x, p["kernel"])[0]

  with pytest.raises(ValueError, match=r"kernel\[0\] \(and 2 more\) is consumed by no "
                     r"dot_general .*read by 3 scan.*scans nested in a layer scan are not"):
    _compress(gptq.method(G4, contract=layout.stacked(None)),
              {"kernel": jnp.ones((3, 2, 4, 4))}, nested, [jnp.ones((2, 4))])

  def also_whole(p, x):  # sliced by the scan, and read whole too
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["kernel"])
    return h + jnp.sum(p["kernel"])

  with pytest.raises(ValueError, match=r"kernel is a stacked parameter read by reduce_sum, "
                     r"not only sliced layer by layer .* leave it out of the rule"):
    _compress(gptq.method(G4, contract=layout.stacked(None)), {"kernel": w}, also_whole,
              [jnp.ones((2, 4))])


def test_readme_snippet_calibrates_a_scanned_model():
  from test_foreign_models import run_readme
  params, apply_s, _, batches = make()
  ns = run_readme("scan", grid=G4, params=params, apply_fn=apply_s, batches=batches[:1])
  w, w0 = flatten(ns["params"]), flatten(params)
  assert not np.array_equal(w["blocks/Dense_0/kernel"], w0["blocks/Dense_0/kernel"])


def test_a_stacked_gptq_kernel_exports_and_loads_back_its_view(tmp_path):
  """Grid scales of a stacked kernel are stored as an ordinary kernel's ([G, depth * N]
  over its matrix view), so the export needs nothing new."""
  from mmjax.compress import export
  params, apply_s, _, batches = make()
  plan, got, cs = _compress(METHODS["gptq4"](STACKED), params, apply_s, batches[:1])
  export.export(got, str(tmp_path / "e"), plan, cs)
  back, view = flatten(export.load(str(tmp_path / "e"))), flatten(plan.view(got, cs))
  for p in view:
    np.testing.assert_array_equal(back[p], view[p], err_msg=p)
  plan, got, cs = _compress(METHODS["int8_acts"](None), params, apply_s, batches[:1])
  with pytest.raises(ValueError, match=r"export: blocks/Dense_0/kernel has per-layer "
                     r"activation scales \(stacked layers under a scan\), which the export does not "
                     "store yet"):
    export.export(got, str(tmp_path / "a"), plan, cs)


def _plain_scanned(p, x):
  """A plain function: jax.checkpoint around a lax.scan over stacked kernels [3, 8, 8]."""
  body = lambda h, w: (jnp.tanh(h @ w["fc"]), None)
  h, _ = jax.checkpoint(lambda h, ws: jax.lax.scan(body, h, ws))(x, p["layers"])
  return h @ p["head"]


def _plain_twin(p, x):
  for i in range(3):
    x = jnp.tanh(x @ p[f"layer_{i}"]["fc"])
  return x @ p["head"]


@pytest.mark.parametrize("method", ["gptq", "int8_acts"])
def test_remat_around_a_plain_lax_scan_compresses_as_its_twin(method):
  r = np.random.default_rng(1)
  stacked = {"layers": {"fc": jnp.asarray(r.normal(size=(3, 8, 8)) / 3, jnp.float32)},
             "head": jnp.asarray(r.normal(size=(8, 2)), jnp.float32)}
  twin = {"head": stacked["head"],
          **{f"layer_{i}": {"fc": stacked["layers"]["fc"][i]} for i in range(3)}}
  batches = [jnp.asarray(r.normal(size=(16, 8)), jnp.float32)]
  make_m = {"gptq": lambda c: gptq.method(formats.grid("int", 3), contract=c),
            "int8_acts": lambda c: activations.inputs(8, "fake")}[method]
  plan_s, got, cs_s = _compress(make_m({r"layers/fc": layout.stacked()}), stacked,
                                _plain_scanned, batches, r".*fc|head")
  plan_t, want, cs_t = _compress(make_m(None), twin, _plain_twin, batches, r".*fc|head")
  for i in range(3):
    _close(got["layers"]["fc"][i], want[f"layer_{i}"]["fc"], f"layer {i}")
  _close(got["head"], want["head"], "head")
  if method == "gptq":
    assert not np.array_equal(got["layers"]["fc"], stacked["layers"]["fc"])
  else:
    (scales,), (twin_scales,) = cs_s.values(), cs_t.values()
    assert scales["layers/fc"].shape == (3,)
    for i in range(3):
      _close(scales["layers/fc"][i], twin_scales[f"layer_{i}/fc"], f"scale {i}")
  y_s = jax.jit(plan_s.apply(_plain_scanned, got, cs_s))(batches[0])
  np.testing.assert_allclose(y_s, jax.jit(plan_t.apply(_plain_twin, want, cs_t))(batches[0]),
                             rtol=1e-5, atol=1e-5)


def test_gradients_through_the_kept_scan_equal_the_twins():
  """Fine-tuning a compressed scanned model: the int8 products (custom gradients) inside
  remat inside the scan give the twin's gradients (to float32 rounding of the largest)."""
  params, apply_s, _, batches = make(True)
  plan_s, got, cs_s = _compress(METHODS["int8_acts"](None), params, apply_s, batches,
                                _rules("int8_acts")[0])
  plan_t, want, cs_t = _twin("int8_acts")
  _, _, apply_t, _ = make()
  loss = lambda plan, apply, cs: jax.jit(jax.grad(
      lambda p: jnp.sum(plan.apply(apply, p, cs)(batches[0]) ** 2)))
  g_s = flatten(unstack(loss(plan_s, apply_s, cs_s)(got)))
  g_t = flatten(loss(plan_t, apply_t, cs_t)(want))
  top = max(float(jnp.abs(g).max()) for g in g_t.values())
  for p in g_t:
    np.testing.assert_allclose(g_s[p], g_t[p], rtol=0, atol=1e-5 * top, err_msg=p)
