"""Convolution kernels in post-training calibration: a conv's statistics are those of its
input patches (checked against a float64 NumPy im2col, itself checked against the conv),
ordered like the kernel's [h*w*in, out] matrix view, so GPTQ, SparseGPT, Wanda and AWQ
solve it as the Dense layer over its patches; sequential calibration carries
a solved conv into the next level; what cannot be measured (grouped convs, a kernel no
product reads, a wrong contraction) is one error whose suggested fix works when followed."""
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from mmjax.compress import Plan, flatten, formats, layout, rules
from mmjax.compress.post_training import awq, gptq, passes, sparsegpt, staged, stats, wanda


def im2col(x, taps, strides, padding, lhs_dil, rhs_dil):
  """float64 reference: x [N, *space, C] -> [N * prod(out), prod(taps) * C], one row per
  output position (row-major), columns (tap..., c) with c fastest."""
  x = np.asarray(x, np.float64)
  s = len(taps)
  for d in range(s):  # input dilation: ld - 1 zeros between neighbours
    if lhs_dil[d] > 1:
      shape = list(x.shape)
      shape[1 + d] = (shape[1 + d] - 1) * lhs_dil[d] + 1
      y = np.zeros(shape)
      idx = [slice(None)] * x.ndim
      idx[1 + d] = slice(None, None, lhs_dil[d])
      y[tuple(idx)] = x
      x = y
  for d, (lo, hi) in enumerate(padding):  # negative padding crops
    pad = [(0, 0)] * x.ndim
    pad[1 + d] = (max(lo, 0), max(hi, 0))
    x = np.pad(x, pad)
    idx = [slice(None)] * x.ndim
    idx[1 + d] = slice(max(-lo, 0), x.shape[1 + d] - max(-hi, 0))
    x = x[tuple(idx)]
  span = [(k - 1) * r + 1 for k, r in zip(taps, rhs_dil)]
  out = [(x.shape[1 + d] - span[d]) // strides[d] + 1 for d in range(s)]
  rows = []
  for n in range(x.shape[0]):
    for pos in itertools.product(*map(range, out)):
      cols = [x[(n, *[p * st + o * r for p, st, o, r in zip(pos, strides, offs, rhs_dil)])]
              for offs in itertools.product(*map(range, taps))]
      rows.append(np.concatenate(cols))
  return np.stack(rows), out


# (input [N, *space, C], taps, out features, strides, padding, lhs dilation, rhs dilation)
CASES = {
    "1d_stride2_pad": ((2, 11, 3), (3,), 4, (2,), ((1, 1),), (1,), (1,)),
    "1d_dilations_negative_pad": ((2, 9, 3), (3,), 4, (1,), ((2, -1),), (2,), (2,)),
    "2d_stride_pad_dilation": ((2, 9, 8, 3), (2, 3), 5, (2, 1), ((1, 0), (2, 1)), (1, 1),
                               (1, 2)),
    "2d_patch_embedding": ((2, 8, 8, 3), (4, 4), 6, (4, 4), ((0, 0), (0, 0)), (1, 1),
                           (1, 1)),
}
LAYOUTS = {1: {"flax": ("NWC", "WIO", "NWC"), "channels_first": ("NCW", "OIW", "NCW")},
           2: {"flax": ("NHWC", "HWIO", "NHWC"), "channels_first": ("NCHW", "OIHW", "NCHW")}}


def _conv_model(case, layout_name, seed=0):
  shape, taps, cout, strides, padding, lhs_dil, rhs_dil = CASES[case]
  s = len(taps)
  dn = LAYOUTS[s][layout_name]
  r = np.random.default_rng(seed)
  w_hwio = r.normal(size=(*taps, shape[-1], cout)) / 3  # [*taps, in, out]
  xs = [r.normal(size=shape) for _ in range(2)]  # [N, *space, C]
  first = layout_name == "channels_first"
  to_x = lambda x: np.moveaxis(x, -1, 1) if first else x
  w = np.transpose(w_hwio, (s + 1, s, *range(s))) if first else w_hwio
  params = {"conv": {"kernel": jnp.asarray(w, jnp.float32)}}

  def apply(p, x):
    return lax.conv_general_dilated(x, p["conv"]["kernel"], strides, padding, lhs_dil,
                                    rhs_dil, dimension_numbers=dn)
  batches = [jnp.asarray(to_x(x), jnp.float32) for x in xs]
  # the kernel's contracted axes, ascending, and the reference columns in that order
  contract = (1, *range(2, 2 + s)) if first else tuple(range(s + 1))
  reorder = ((lambda m: m.reshape(len(m), *taps, shape[-1]).transpose(
      0, s + 1, *range(1, s + 1)).reshape(len(m), -1)) if first else (lambda m: m))
  ref = [reorder(im2col(x, taps, strides, padding, lhs_dil, rhs_dil)[0]) for x in xs]
  return params, apply, batches, contract, ref


@pytest.mark.parametrize("layout_name", ["flax", "channels_first"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_patch_statistics_equal_a_float64_im2col(case, layout_name):
  params, apply, batches, contract, ref = _conv_model(case, layout_name)
  w = params["conv"]["kernel"]
  wm = np.asarray(layout.to_matrix(w, contract), np.float64)
  for x, rows in zip(batches, ref):  # the reference is the conv: rows @ W = its output
    y = np.asarray(apply(params, x), np.float64)
    out_axis = 1 if layout_name == "channels_first" else -1
    np.testing.assert_allclose(rows @ wm, np.moveaxis(y, out_axis, -1).reshape(len(rows), -1),
                               rtol=1e-4, atol=1e-4)
  got, order = stats.collect(apply, params, batches, ["conv/kernel"], stats.STATS,
                             lambda path, ndim: contract)
  assert order == ["conv/kernel"]
  got = {k: np.asarray(v, np.float64) for k, v in got["conv/kernel"].items()}
  x = np.concatenate(ref)
  scale = np.abs(x.T @ x).max()
  assert got["count"] == len(x)
  np.testing.assert_allclose(got["gram"], x.T @ x, rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(got["sq"], (x * x).sum(0), rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(got["absmean"], np.abs(x).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["amax"], np.abs(x).max(0), rtol=1e-6, atol=0)


def test_a_channels_first_kernel_needs_its_contraction_and_the_hint_gives_it():
  params, apply, batches, contract, _ = _conv_model("2d_stride_pad_dilation", "channels_first")
  with pytest.raises(ValueError, match=r"conv/kernel \(and 0 more\) is contracted over axes "
                     r"\(1, 2, 3\) by "
                     r"the model but the rule says \(0, 1, 2\); pass contract=") as e:
    stats.collect(apply, params, batches, ["conv/kernel"], ("gram",))
  hint = re.search(r"pass contract=(\{.*\}) to the method", str(e.value)).group(1)
  spec = eval(hint)  # noqa: S307 (the hint is a literal dict of raw-string patterns)
  got, _ = stats.collect(apply, params, batches, ["conv/kernel"], ("gram",),
                         lambda path, ndim: layout.contract_axes(spec, path, ndim))
  assert got["conv/kernel"]["gram"].shape == (3 * 2 * 3,) * 2
  plan = Plan(rules([(r".*kernel", gptq.method(formats.grid("int", 4, granularity="channel"),
                                               contract=spec))]))
  p0, cs = plan.start(params, jax.random.PRNGKey(0))
  out, _ = plan.calibrate(apply, p0, cs, batches)  # [O, I, H, W]: a scale per output O
  m = np.asarray(out["conv"]["kernel"]).reshape(5, -1)
  assert not np.array_equal(m, np.asarray(params["conv"]["kernel"]).reshape(5, -1))
  assert max(len(np.unique(row)) for row in m) <= 15


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(6, (3, 3), strides=(2, 1), padding="SAME", name="conv")(x)


@pytest.mark.parametrize("name", ["gptq", "sparsegpt", "wanda", "awq"])
def test_a_conv_kernel_is_solved_as_the_dense_layer_over_its_patches(name):
  """The same method on a Flax Conv and on a Dense layer fed the conv's explicit patches
  (float64 im2col, here) gives the same weights."""
  model = _ConvNet()
  r = np.random.default_rng(1)
  xs = [jnp.asarray(r.normal(size=(3, 7, 6, 4)), jnp.float32) for _ in range(2)]
  params = model.init(jax.random.PRNGKey(0), xs[0])["params"]
  kernel = params["conv"]["kernel"]  # [3, 3, 4, 6]
  # Flax's SAME for a 3-wide window, stride (2, 1), on 7 x 6: pads (1, 1) on both axes
  patches = [jnp.asarray(im2col(x, (3, 3), (2, 1), ((1, 1), (1, 1)), (1, 1), (1, 1))[0],
                         jnp.float32) for x in xs]
  np.testing.assert_allclose(
      np.asarray(patches[0] @ kernel.reshape(-1, 6)).reshape(3, 4, 6, 6),
      np.asarray(model.apply({"params": params}, xs[0]) - params["conv"]["bias"]),
      rtol=1e-5, atol=1e-5)
  dense = {"fc": {"kernel": kernel.reshape(-1, 6)}}
  dense_apply = lambda p, x: x @ p["fc"]["kernel"]
  make = {"gptq": lambda: gptq.method(formats.grid("int", 3, granularity="channel")),
          "sparsegpt": lambda: sparsegpt.method(0.5),
          "wanda": lambda: wanda.method(0.5),
          "awq": lambda: awq.method(formats.grid("int", 3, granularity="channel"))}[name]
  out = {}
  for key, p, f, batches in (("conv", params, lambda p, x: model.apply({"params": p}, x), xs),
                             ("fc", dense, dense_apply, patches)):
    plan = Plan(rules([(r".*kernel", make())]))
    p0, cs = plan.start(p, jax.random.PRNGKey(0))
    solved, _ = plan.calibrate(f, p0, cs, batches)
    out[key] = np.asarray(layout.to_matrix(flatten(solved)[f"{key}/kernel"], (0, 1, 2) if
                                           key == "conv" else (0,)))
  assert not np.array_equal(out["fc"], np.asarray(dense["fc"]["kernel"]))  # it did something
  np.testing.assert_allclose(out["conv"], out["fc"], rtol=1e-5, atol=1e-6)


def _stem_model():
  """A 1-D conv stem, two Dense blocks, a head: a plain function over a dict."""
  r = np.random.default_rng(2)
  params = {"stem": {"kernel": r.normal(size=(3, 4, 16)) / 3},
            "block_0": {"w": r.normal(size=(16, 16)) / 4},
            "block_1": {"w": r.normal(size=(16, 16)) / 4},
            "head": {"w": r.normal(size=(16, 3)) / 4}}

  def apply(p, x):  # x [b, t, 4]
    h = jnp.tanh(lax.conv_general_dilated(x, p["stem"]["kernel"], (2,), ((1, 1),),
                                          dimension_numbers=("NWC", "WIO", "NWC")))
    h = jnp.tanh(h @ p["block_0"]["w"])
    h = h + jnp.tanh(h @ p["block_1"]["w"])
    return h.mean(1) @ p["head"]["w"]

  def twin(p, x):
    """float64 NumPy: {kernel path: its input rows}."""
    rows, out = im2col(x, (3,), (2,), ((1, 1),), (1,), (1,))
    h = np.tanh(rows @ p["stem"]["kernel"].reshape(-1, 16)).reshape(x.shape[0], out[0], 16)
    xs = {"stem/kernel": rows, "block_0/w": h.reshape(-1, 16)}
    h = np.tanh(h @ p["block_0"]["w"])
    xs["block_1/w"] = h.reshape(-1, 16)
    h = h + np.tanh(h @ p["block_1"]["w"])
    xs["head/w"] = h.mean(1)
    return xs

  batches = [r.normal(size=(4, 13, 4)) for _ in range(2)]
  return params, apply, twin, batches


def test_sequential_levels_see_the_solved_conv():
  """Each level's Gram equals the float64 forward's with every earlier level solved, the
  conv stem the first level."""
  params, apply, twin, batches = _stem_model()
  p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  b32 = [jnp.asarray(b, jnp.float32) for b in batches]
  paths = ["stem/kernel", "block_0/w", "block_1/w", "head/w"]
  _, levels = passes.solve_order(apply, p32, b32[0], paths)
  assert levels == [[p] for p in paths]
  contract_of = lambda path, ndim: layout.contract_axes(None, path, ndim)
  cut = staged.build(apply, p32, list(flatten(p32)), b32, paths, levels, ("gram",),
                     contract_of)
  solved64 = {p: np.asarray(a, np.float64) for p, a in flatten(params).items()}
  current = dict(flatten(p32))
  for lv, level in enumerate(levels):
    from mmjax.compress import unflatten
    got = cut.stats(lv, lambda b: jax.tree.leaves((unflatten(current, p32), b)))
    ref = [twin(unflatten(solved64), b) for b in batches]
    for p in level:
      x = np.concatenate([r[p] for r in ref])
      np.testing.assert_allclose(np.asarray(got[p]["gram"], np.float64), x.T @ x, rtol=1e-4,
                                 atol=1e-4 * np.abs(x.T @ x).max())
      w = solved64[p]  # "solve": round to a coarse grid, so later levels see a change
      solved64[p] = np.round(w * 4) / 4
      current[p] = jnp.asarray(solved64[p], jnp.float32)
  # and the whole method: sequential GPTQ through the conv, every kernel on its grid
  g = formats.grid("int", 3, granularity="channel")
  plan = Plan(rules([(r".*", gptq.method(g))]))
  p0, cs = plan.start(p32, jax.random.PRNGKey(0))
  out, cs = plan.calibrate(apply, p0, cs, b32)
  for p, w in flatten(out).items():
    m = np.asarray(layout.to_matrix(w, tuple(range(w.ndim - 1))))
    assert max(len(np.unique(c)) for c in m.T) <= 7, p


def _unmeasurable(kind):
  """A weight whose product has no single input matrix (a depthwise conv, or a batched
  dot_general), then a Dense layer."""
  r = np.random.default_rng(3)
  params = {"fc": {"kernel": jnp.asarray(r.normal(size=(8, 8)), jnp.float32)}}
  if kind == "grouped":
    params["dw"] = {"kernel": jnp.asarray(r.normal(size=(3, 1, 8)), jnp.float32)}
  else:
    params["dw"] = {"kernel": jnp.asarray(r.normal(size=(2, 8, 8)), jnp.float32)}

  def apply(p, x):
    if kind == "grouped":
      h = lax.conv_general_dilated(x, p["dw"]["kernel"], (1,), "SAME",
                                   dimension_numbers=("NWC", "WIO", "NWC"),
                                   feature_group_count=8)
    else:  # one [8, 8] matrix per example of a batch of 2
      h = jnp.einsum("btc,bcd->btd", x, p["dw"]["kernel"])
    return jnp.tanh(h) @ p["fc"]["kernel"]
  batches = [jnp.asarray(r.normal(size=(2, 10, 8)), jnp.float32) for _ in range(2)]
  return params, apply, batches


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("kind", ["grouped", "batched"])
def test_an_unmeasurable_product_is_named_and_the_suggested_rule_works(kind, mode):
  why = {"grouped": r"a grouped convolution \(feature_group_count=8\)",
         "batched": r"a batched dot_general \(batch dims\)"}[kind]
  params, apply, batches = _unmeasurable(kind)
  g = formats.grid("int", 4, granularity="channel")
  plan = Plan(rules([(r".*kernel", gptq.method(g, mode=mode))]))
  p0, cs = plan.start(params, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"dw/kernel \(and 0 more\) is consumed by " + why +
                     r", which has no single input matrix; a rule that leaves them out: "
                     r"r'([^']+)'") as e:
    plan.calibrate(apply, p0, cs, batches)
  rule = re.search(r"a rule that leaves them out: r'([^']+)'", str(e.value)).group(1)
  plan = Plan(rules([(rule, gptq.method(g, mode=mode))]))
  p0, cs = plan.start(params, jax.random.PRNGKey(0))
  out, _ = plan.calibrate(apply, p0, cs, batches)
  assert np.array_equal(out["dw"]["kernel"], params["dw"]["kernel"])  # left out
  assert not np.array_equal(out["fc"]["kernel"], params["fc"]["kernel"])


def test_an_n_m_size_mismatch_names_a_rule_that_passes_the_check():
  shapes = {"a/kernel": (6, 8), "b/kernel": (8, 8), "c/kernel": (3, 3, 2, 8),
            "d/kernel": (2, 2, 4, 8)}
  with pytest.raises(ValueError, match=r"a/kernel \(and 1 more\): the contraction size 6 is "
                     r"not divisible by M=4 of N:M; choose another M, or a rule that leaves "
                     r"them out: r'([^']+)'") as e:
    Plan(rules([(r".*", sparsegpt.method(n_m=(2, 4)))])).check(shapes)
  rule = re.search(r"a rule that leaves them out: r'([^']+)'", str(e.value)).group(1)
  plan = Plan(rules([(rule, sparsegpt.method(n_m=(2, 4)))])).check(shapes)
  assert [p for p in shapes if re.fullmatch(rule, p)] == ["b/kernel", "d/kernel"]
  assert plan.entries(list(shapes))[0].paths == ("b/kernel", "d/kernel")
