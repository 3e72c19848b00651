"""Post-training calibration of foreign models with convolutions (`foreign_zoo`: a linen
ViT with a conv patch stem, an NNX Whisper-like encoder with two convs over time, a
CLIP-like two-tower model), through the public API and the README's rule `.*kernel`.

On each, with random weights and inputs, layer by layer on the inputs each layer was
solved from (sequential calibration: every earlier level compressed), measured in
float64: GPTQ's output error ||XW - XŴ||² is below round-to-nearest's on the same grid,
SparseGPT's below magnitude pruning's at the same sparsity, and every Hessian XᵀX is
non-zero (a GPTQ whose Hessians are zero runs as something else, silently). Every error
a rule can cause names a fix that works when followed."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from foreign_zoo import CONVS, MODELS
from mmjax.compress import Plan, activations, flatten, formats, intercept, layout, rules
from mmjax.compress import unflatten
from mmjax.compress.post_training import gptq, passes, smoothquant, sparsegpt, stats

G3 = formats.grid("int", 3, granularity="channel")
KERNELS = r".*kernel"


def _run(plan, params, apply, batches):
  p0, cs = plan.start(params, jax.random.PRNGKey(0))
  return plan.calibrate(apply, p0, cs, batches)


def _inputs(apply, paths):
  """jitted f(params, batch) -> {path: X [T, K]}: each kernel's input rows (a conv's:
  its patches) in the order of the kernel's matrix view."""
  axes = lambda d: layout.contract_axes(layout.FLAX_ATTENTION, d.path, d.w.ndim)
  f = intercept.observe(apply, paths, lambda d: stats.rows(d, axes(d)), convs=True)
  return jax.jit(lambda p, b: {k: jnp.concatenate(v) for k, v in f(p, b).items()})


def _matrix(w, path):
  return np.asarray(layout.to_matrix(jnp.asarray(w), layout.contract_axes(
      layout.FLAX_ATTENTION, path, w.ndim)), np.float64)


def _rtn(w):
  m = jnp.asarray(w, jnp.float32)
  return np.asarray(G3.round_matrix(m, *G3.fit(m)), np.float64)


def _magnitude(w, sparsity):
  """float64 reference: the smallest |w| of the whole matrix zeroed."""
  k = int(round(sparsity * w.size))
  cut = np.argsort(np.abs(w).reshape(-1), kind="stable")[:k]
  out = w.reshape(-1).copy()
  out[cut] = 0
  return out.reshape(w.shape)


def _per_layer(apply, params, solved, batches, baseline):
  """{path: (method's error, baseline's error, Hessian's largest |entry|)}, each layer on
  its sequential inputs: the forward with every earlier level's kernels as solved."""
  dense, new = flatten(params), flatten(solved)
  paths = sorted(p for p in dense if re.fullmatch(KERNELS, p))
  _, levels = passes.solve_order(apply, params, batches[0], paths)
  f = _inputs(apply, paths)
  out, before = {}, set()
  for level in levels:
    view = unflatten({p: (new[p] if p in before else a) for p, a in dense.items()}, params)
    xs = [f(view, b) for b in batches]
    for p in level:
      x = np.concatenate([np.asarray(x[p], np.float64) for x in xs])
      w = _matrix(dense[p], p)
      err = lambda w_hat: float(np.sum((x @ (w - w_hat)) ** 2))
      out[p] = (err(_matrix(new[p], p)), err(baseline(w)), float(np.abs(x.T @ x).max()))
    before |= set(level)
  assert sorted(out) == paths
  return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gptq_and_sparsegpt_beat_their_baselines_on_every_layer(name):
  params, apply, batches = MODELS[name]()
  calib = batches(3)
  for method, baseline, what in (
      (gptq.method(G3, contract=layout.FLAX_ATTENTION), _rtn, "GPTQ vs RTN"),
      (sparsegpt.method(0.5, contract=layout.FLAX_ATTENTION), lambda w: _magnitude(w, 0.5),
       "SparseGPT vs magnitude")):
    solved, _ = _run(Plan(rules([(KERNELS, method)])), params, apply, calib)
    errs = _per_layer(apply, params, solved, calib, baseline)
    worse = sorted(p for p, (e, b, _) in errs.items() if not e < b)
    ratios = [e / b for e, b, _ in errs.values()]
    print(f"{name} {what}: below the baseline on {len(errs) - len(worse)} of {len(errs)} "
          f"layers (error ratio {min(ratios):.3f}..{max(ratios):.3f}); not below: {worse}")
    assert not worse, (what, worse)
    assert all(h > 0 for _, _, h in errs.values())  # no zero Hessian
    assert any(p in errs for p in CONVS[name])  # the convs were solved, not skipped
    if "SparseGPT" in what:
      for p in errs:
        assert abs(np.mean(_matrix(flatten(solved)[p], p) == 0) - 0.5) < 0.02, p


def test_the_readme_rule_runs_gptq_on_a_vit_with_a_conv_stem():
  """`rules([(r".*kernel", gptq.method(grid))])` as the README writes it: the attention
  kernels' contraction is the one thing to add, and the error says how."""
  params, apply, batches = MODELS["vit"]()
  grid = formats.grid("int", 4, granularity="group", group_size=16)  # tiny widths: 16
  with pytest.raises(ValueError, match=r"pass contract=layout.FLAX_ATTENTION to the method"):
    _run(Plan(rules([(r".*kernel", gptq.method(grid))])), params, apply, batches(2))
  plan = Plan(rules([(r".*kernel", gptq.method(grid, contract=layout.FLAX_ATTENTION))]))
  solved, cstate = _run(plan, params, apply, batches(2))
  w = np.asarray(solved["embedding"]["kernel"])  # [4, 4, 3, 32]: 48 inputs, 3 groups
  assert not np.array_equal(w, np.asarray(params["embedding"]["kernel"]))
  m = np.asarray(layout.to_matrix(jnp.asarray(w), (0, 1, 2)))
  assert max(len(np.unique(m[g * 16:(g + 1) * 16, j])) for g in range(3) for j in
             range(32)) <= 15
  x = batches(1, seed=9)[0]
  out = jax.jit(lambda p, b: plan.apply(apply, p, cstate)(b))(solved, x)
  assert np.isfinite(np.asarray(out)).all()


def _hinted_rule(err) -> str:
  return re.search(r"a rule that leaves them out: r'([^']+)'", str(err)).group(1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_int8_activations_on_a_conv_name_a_rule_that_works(name):
  """Activation quantization rewrites matmuls only: on `.*kernel` the error names the
  convs and a rule without them, which matches every other kernel and runs."""
  params, apply, batches = MODELS[name]()
  calib = batches(2)
  kernels = sorted(p for p in flatten(params) if re.fullmatch(KERNELS, p))
  for make in (lambda: activations.inputs(8, "int8"),
               lambda: smoothquant.method(contract=layout.FLAX_ATTENTION)):
    with pytest.raises(ValueError, match="consumed by no dot_general") as e:
      _run(Plan(rules([(KERNELS, make())])), params, apply, calib)
    assert str(e.value).count("\n") == 0 and CONVS[name][0] in str(e.value)
    rule = _hinted_rule(e.value)
    assert [p for p in flatten(params) if re.fullmatch(rule, p)] == sorted(
        set(kernels) - set(CONVS[name]))
    plan = Plan(rules([(rule, make())]))
    solved, cstate = _run(plan, params, apply, calib)
    out = np.asarray(jax.jit(lambda p, b: plan.apply(apply, p, cstate)(b))(solved, calib[0]))
    ref = np.asarray(jax.jit(apply)(params, calib[0]))
    assert np.isfinite(out).all() and 0 < np.abs(out - ref).max() < 0.5 * np.abs(ref).max()


def test_following_each_hint_from_the_widest_rule_reaches_a_run():
  """GPTQ on `.*` (every leaf of the ViT): the config-time check names the 1-D leaves, the
  calibration the leaves no product reads (attention biases, cls token, positions); each
  error's rule, followed, fixes what it names, and the last runs on exactly the kernels."""
  params, apply, batches = MODELS["vit"]()
  shapes = {p: a.shape for p, a in flatten(params).items()}
  rule, seen = r".*", []
  for _ in range(4):
    plan = Plan(rules([(rule, gptq.method(G3, contract=layout.FLAX_ATTENTION))]))
    try:
      plan.check(shapes)
      _run(plan, params, apply, batches(2))
      break
    except ValueError as e:
      seen.append(str(e))
      new = _hinted_rule(e)
      assert {p for p in shapes if re.fullmatch(new, p)} < {p for p in shapes if
                                                             re.fullmatch(rule, p)}
      rule = new
  assert len(seen) == 2, seen
  assert "has shape (32,): post-training methods work on matmul and conv kernels" in seen[0]
  # the 2-D attention biases [heads, head_dim] pass the shape check; no product reads them
  assert re.search(r"key/bias \(and 7 more\) is consumed by no dot_general the interceptor "
                   r"can see \(read by 1 add, 6 reshape, 1 tile\)", seen[1]), seen[1]
  assert sorted(p for p in shapes if re.fullmatch(rule, p)) == sorted(
      p for p in shapes if p.endswith("kernel"))


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return jnp.tanh(nn.Dense(8, name="fc")(c)), None


class _Scanned(nn.Module):
  """Two Dense layers stacked under nn.scan (kernel [2, 8, 8]), then a head."""
  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="layers")(x, None)
    return nn.Dense(3, name="head")(x)


def test_stacked_layers_under_scan_need_a_stacked_layout_and_the_one_named_works():
  """A kernel stacked under nn.scan is calibrated layer by layer (`unroll`), once the layout
  says it is stacked: the error names the leaf and the spec, which then runs and solves
  each layer (and the head)."""
  model = _Scanned()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  apply = lambda p, b: model.apply({"params": p}, b)
  with pytest.raises(ValueError, match=r"layers/fc/kernel \(and 0 more\) of shape \(2, 8, 8\) "
                     r"is stacked \(a scan slices its axis 0 into 2 layers\) .*pass "
                     r"contract=\{r'layers/fc/kernel': layout.stacked\(None\)\}") as e:
    _run(Plan(rules([(KERNELS, gptq.method(G3))])), params, apply, [x])
  rx = re.search(r"contract=\{r'([^']+)'", str(e.value)).group(1)
  solved, _ = _run(Plan(rules([(KERNELS, gptq.method(G3, contract={rx: layout.stacked()}))])),
                   params, apply, [x])
  assert not np.array_equal(solved["head"]["kernel"], params["head"]["kernel"])
  for i in range(2):
    assert not np.array_equal(solved["layers"]["fc"]["kernel"][i],
                              params["layers"]["fc"]["kernel"][i])


def test_suggested_rules_match_exactly_the_kept_paths():
  """`intercept.rule_for` on every zoo model's paths (and paths with regex metacharacters),
  many random splits: the rule fully matches the kept paths and nothing else."""
  r = np.random.default_rng(0)
  odd = sorted(["a.b/[0]/kernel", "a.b/[1]/kernel", "a+b/kernel", "x(1)/w", "x(1)/bias", "w"])
  for universe in [sorted(flatten(MODELS[n]()[0])) for n in sorted(MODELS)] + [odd]:
    for _ in range(25):
      matched = [p for p in universe if r.random() < 0.7] or universe[:2]
      drop = [p for p in matched if r.random() < 0.3]
      keep = sorted(set(matched) - set(drop))
      rx = intercept.rule_for(keep, drop, universe)
      if not keep:
        assert rx is None
        continue
      assert "\n" not in rx
      assert [p for p in universe if re.fullmatch(rx, p)] == keep, (rx, keep)
