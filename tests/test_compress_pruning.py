"""Pruning transforms: exact realized sparsity, valid N:M groups, sparsity ramps, masks that
survive optimizer steps, global vs per-layer thresholds, random baseline, bad input."""
import warnings

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.compress import Method, Plan, chain, rules
from mmjax.compress import pruning
from mmjax.compress.select import n_m_mask, top_k_masks


def _tree(seed=0):
  r = np.random.default_rng(seed)
  return {"a": {"kernel": jnp.asarray(r.normal(size=(16, 24)), jnp.float32),
                "bias": jnp.asarray(r.normal(size=(24,)), jnp.float32)},
          "b": {"kernel": jnp.asarray(3.0 * r.normal(size=(24, 8)), jnp.float32)}}


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(n=st.integers(1, 300), k=st.integers(0, 300), ties=st.booleans(),
                  seed=st.integers(0, 10_000))
def test_top_k_keeps_exactly_the_k_largest(n, k, ties, seed):
  k = min(k, n)
  r = np.random.default_rng(seed)
  x = r.integers(0, 4, n).astype(np.float32) if ties else r.normal(size=n).astype(np.float32)
  mask = np.asarray(top_k_masks([jnp.asarray(x)], k)[0])
  assert mask.sum() == k
  if 0 < k < n:  # every kept |x| >= every dropped |x| (numpy sort as the reference)
    assert np.abs(x)[mask].min() >= np.abs(x)[~mask].max()
    assert np.abs(x)[mask].min() == np.sort(np.abs(x))[::-1][k - 1]


def test_top_k_ranks_several_arrays_together():
  xs = [jnp.asarray(np.arange(10, dtype=np.float32)), jnp.asarray(np.arange(10, 20.0))]
  m = top_k_masks(xs, 5)
  assert int(m[0].sum()) == 0 and np.asarray(m[1]).tolist() == [False] * 5 + [True] * 5


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8), (2, 8)]),
                  groups=st.integers(1, 6), out=st.integers(1, 9), seed=st.integers(0, 999))
def test_n_m_every_group_valid(nm, groups, out, seed):
  n, m = nm
  w = np.random.default_rng(seed).normal(size=(groups * m, out)).astype(np.float32)
  mask = np.asarray(n_m_mask(jnp.asarray(w), n, m))
  g = mask.reshape(groups, m, out)
  assert (g.sum(axis=1) == n).all()
  # the kept entries of each group are its n largest magnitudes
  a = np.abs(w).reshape(groups, m, out)
  kept_min = np.where(g, a, np.inf).min(axis=1)
  dropped_max = np.where(~g, a, -np.inf).max(axis=1)
  assert (kept_min >= dropped_max).all()


def _plan(t, pattern=r".*kernel"):
  params = _tree()
  return Plan(rules([(pattern, t)], list(_flat_paths(params)))), params


def _view(plan, params, seed=0):
  """The weights a run computes with after `Plan.start` (masks applied at step 0)."""
  return plan.view(*plan.start(params, jax.random.PRNGKey(seed)))


def _flat_paths(params):
  from mmjax.compress import flatten
  return flatten(params).keys()


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("score", ["magnitude", "random"])
def test_realized_sparsity_equals_target(scope, score):
  plan, params = _plan(pruning.unstructured(0.7, score=score, scope=scope))
  view = _view(plan, params)
  sizes = {k: params[k]["kernel"].size for k in ("a", "b")}
  zeros = {k: int((np.asarray(view[k]["kernel"]) == 0).sum()) for k in ("a", "b")}
  if scope == "layer":  # each layer to its own target, +-1 element
    for k in sizes:
      assert abs(zeros[k] - 0.7 * sizes[k]) <= 1
  else:  # one threshold: the large-magnitude layer b keeps more (magnitude only)
    assert abs(sum(zeros.values()) - 0.7 * sum(sizes.values())) <= 1
    if score == "magnitude":
      assert zeros["b"] / sizes["b"] < zeros["a"] / sizes["a"]
  np.testing.assert_array_equal(view["a"]["bias"], params["a"]["bias"])  # not matched


def test_magnitude_keeps_the_largest_weights_per_layer():
  plan, params = _plan(pruning.unstructured(0.5))
  view = _view(plan, params)
  w, v = np.asarray(params["a"]["kernel"]), np.asarray(view["a"]["kernel"])
  kept = v != 0
  assert np.abs(w[kept]).min() >= np.abs(w[~kept]).max()


def test_pruned_weights_stay_zero_under_adam():
  plan, params = _plan(pruning.unstructured(0.8))
  params, state = plan.start(params, jax.random.PRNGKey(0))
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, state, i):
    def loss(p):
      v = plan.view(p, state)
      return sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree.leaves(v))
    g = jax.grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, u)
    params, state = plan.update(params, state, i)
    return params, opt, state

  mask0 = np.asarray(state["magnitude_layer_0.8"]["masks"]["a/kernel"])
  for i in range(1, 21):
    params, opt, state = step(params, opt, state, i)
  w = np.asarray(params["a"]["kernel"])
  assert (w[~mask0] == 0).all() and (w[mask0] != 0).all()


def test_polynomial_ramp_monotone_and_reaches_target():
  s = pruning.Ramp("polynomial", begin=10, end=110, every=10).validate()
  vals = [float(s.sparsity(t, 0.9)) for t in range(0, 131)]
  assert vals[0] == 0.0 and all(b >= a for a, b in zip(vals, vals[1:]))
  assert vals[110] == pytest.approx(0.9) and vals[130] == pytest.approx(0.9)
  updates = [t for t in range(0, 131) if bool(s.is_update_step(t))]
  assert updates == list(range(10, 111, 10))


def test_gradual_pruning_in_a_training_loop_reaches_target_at_end_step():
  ramp = pruning.Ramp("polynomial", begin=0, end=40, every=10)
  plan, params = _plan(pruning.unstructured(0.9, ramp=ramp))
  state = plan.init(params, jax.random.PRNGKey(0))
  seen = []
  update = jax.jit(plan.update)
  for t in range(1, 51):
    params = jax.tree.map(lambda x: x + 0.01, params)  # a stand-in optimizer step
    params, state = update(params, state, t)
    seen.append(1 - float(np.asarray(state["magnitude_layer_0.9"]["masks"]["a/kernel"]).mean()))
  assert all(b >= a - 1e-9 for a, b in zip(seen, seen[1:]))
  assert abs(seen[39] - 0.9) < 1 / 384 + 1e-9 and seen[-1] == seen[39]
  assert seen[8] < 0.9 * 0.8  # still ramping before the end


def test_random_pruning_differs_from_magnitude():
  pm, params = _plan(pruning.unstructured(0.5))
  pr, _ = _plan(pruning.unstructured(0.5, score="random"))
  mm = np.asarray(pm.init(params, jax.random.PRNGKey(0))["magnitude_layer_0.5"]["masks"]["a/kernel"])
  mr = np.asarray(pr.init(params, jax.random.PRNGKey(0))["random_layer_0.5"]["masks"]["a/kernel"])
  assert mm.sum() == mr.sum() and (mm != mr).mean() > 0.2


def test_n_m_transform_and_chain_with_another():
  plan, params = _plan(pruning.n_of_m(2, 4))
  v = _view(plan, params)
  g = (np.asarray(v["a"]["kernel"]) != 0).reshape(4, 4, 24).sum(axis=1)
  assert (g == 2).all()
  # 2:4 on a and 90% on b, in one rules([...]) (first match wins)
  both = Plan(rules([(r"a/kernel", pruning.n_of_m(2, 4)),
                     (r"b/kernel", pruning.unstructured(0.9))], list(_flat_paths(params))))
  v2 = _view(both, params)
  assert (np.asarray(v2["b"]["kernel"]) == 0).mean() >= 0.875
  g2 = (np.asarray(v2["a"]["kernel"]) != 0).reshape(4, 4, 24).sum(axis=1)
  assert (g2 == 2).all()


def _nm_reference(w, n, m, contract):
  """float64 NumPy: contraction axes to the front, flattened; n largest of every m."""
  rest = [a for a in range(w.ndim) if a not in contract]
  moved = np.transpose(np.abs(np.asarray(w, np.float64)), list(contract) + rest)
  flat = moved.reshape(-1, int(np.prod([w.shape[a] for a in rest])))
  keep = np.zeros_like(flat, bool)
  for g in range(flat.shape[0] // m):
    block = flat[g * m:(g + 1) * m]
    order = np.argsort(-block, axis=0, kind="stable")[:n]
    for col in range(flat.shape[1]):
      keep[g * m + order[:, col], col] = True
  return np.transpose(keep.reshape(moved.shape), np.argsort(list(contract) + rest))


@pytest.mark.parametrize("shape, contract", [
    ((16, 8), None),               # Dense [in, out]
    ((16, 2, 4), (0,)),            # DenseGeneral q/k/v [in, heads, head_dim]
    ((2, 8, 6), (0, 1)),           # DenseGeneral out [heads, head_dim, out]
    ((3, 3, 4, 5), None),          # Conv [h, w, in, out]
])
def test_n_m_groups_run_along_the_contraction_axes(shape, contract):
  from mmjax.compress.select import n_m_mask
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  axes = tuple(range(len(shape) - 1)) if contract is None else contract
  mask = np.asarray(n_m_mask(jnp.asarray(w), 2, 4, axes))
  np.testing.assert_array_equal(mask, _nm_reference(w, 2, 4, axes))
  assert mask.mean() == 0.5


@pytest.mark.parametrize("every", [None, 1, 3])
def test_n_m_mask_follows_the_weights_every_k_steps(every):
  """A fake gradient lifts the pruned weights of every group above the kept ones before
  each update: with `every=k` the mask follows at steps k, 2k (the NumPy reference's n
  largest of the current weights); by default it stays the one chosen at step 0."""
  plan = Plan(rules([(r"k", pruning.n_of_m(2, 4, every=every))]))
  w = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  params, cs = plan.start({"k": jnp.asarray(w)}, jax.random.PRNGKey(0))
  first = mask = np.asarray(cs["2:4"]["masks"]["k"])
  np.testing.assert_array_equal(first, _nm_reference(w, 2, 4, (0,)))
  update = jax.jit(plan.update)
  for step in range(1, 7):
    fake_grad = np.where(mask, 0.0, -(10.0 + step)).astype(np.float32)  # sgd, lr 1
    stepped = np.asarray(params["k"]) - fake_grad
    params, cs = update({"k": jnp.asarray(stepped)}, cs, step)
    if every is not None and step % every == 0:
      want = _nm_reference(stepped, 2, 4, (0,))
      assert (want != mask).all()  # the fake gradient swapped every kept weight out
      mask = want
    got = np.asarray(cs["2:4"]["masks"]["k"])
    np.testing.assert_array_equal(got, mask, err_msg=f"step {step}")
    np.testing.assert_array_equal(np.asarray(params["k"]), np.where(mask, stepped, 0.0))
  if every is None:
    np.testing.assert_array_equal(mask, first)


def test_stage_conflicts_and_names_are_errors():
  params = _tree()
  paths = list(_flat_paths(params))
  with pytest.raises(ValueError, match="both claim a/kernel for the update stage"):
    Plan(rules([(r".*kernel", pruning.unstructured(0.5))]),
         rules([(r"a/kernel", pruning.n_of_m(2, 4))])).entries(paths)
  with pytest.raises(ValueError, match="two compression methods are named"):
    Plan(rules([(r"a/kernel", pruning.unstructured(0.5))]),
         rules([(r"b/kernel", pruning.unstructured(0.5))])).entries(paths)
  Plan(rules([(r"a/kernel", pruning.unstructured(0.5))]),  # renamed: fine
       rules([(r"b/kernel", pruning.unstructured(0.5).renamed("b_half"))])).entries(paths)
  with pytest.raises(ValueError, match="defines none of the stages"):
    Method("nothing", init=lambda flat, rng: {})


def test_state_is_keyed_by_name_so_reordered_rules_read_the_same_checkpoint():
  params = _tree()
  a, b = pruning.unstructured(0.5), pruning.n_of_m(2, 4)
  one = Plan(rules([(r"a/kernel", a), (r"b/kernel", b)]))
  two = Plan(rules([(r"b/kernel", b), (r"a/kernel", a)]))
  s1, s2 = one.init(params, jax.random.PRNGKey(0)), two.init(params, jax.random.PRNGKey(0))
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("bad, match", [
    (lambda: pruning.unstructured(1.0), r"sparsity=1.0 is outside \[0, 1\)"),
    (lambda: pruning.unstructured(-0.1), r"outside \[0, 1\)"),
    (lambda: pruning.n_of_m(4, 4), "1 <= N < M"),
    (lambda: pruning.n_of_m(2, 4, every=0), "every=0 must be a whole number of steps >= 1"),
    (lambda: Plan(pruning.n_of_m(2, 4)).check({"x/kernel": (6, 8)}), "not divisible by M"),
    (lambda: Plan(pruning.n_of_m(2, 4, contract=(3,))).check({"x/kernel": (8, 8)}),
     r"contraction axes \(3,\) do not fit x/kernel"),
    (lambda: pruning.unstructured(0.5, scope="tower"), "scope='tower' is unknown"),
    (lambda: pruning.Ramp("polynomial", begin=5, end=5).validate(), "must be > begin"),
    (lambda: rules([(r"c/.*", pruning.unstructured(0.5))], ["a/kernel", "b/kernel"]),
     "(?s)matches no parameter.*a/kernel"),
])
def test_bad_input(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()


@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1,
                                  max_size=5),
                  sparsity=st.floats(0.0, 0.95), bits=st.integers(2, 8),
                  seed=st.integers(0, 999))
def test_random_trees_prune_then_quantize(shapes, sparsity, bits, seed):
  """Over random trees: per-layer sparsity exact to the element after chaining a quantizer,
  the quantized view keeps pruned weights at zero, and levels stay within 2**bits - 1.
  A [1, n] kernel (one value per channel scale) is left to pruning alone: the quantizer
  skips it, and a tree of only such kernels gives the quantizer's rule nothing (an error)."""
  from mmjax.compress import quant
  r = np.random.default_rng(seed)
  params = {f"layer{i}": {"kernel": jnp.asarray(r.normal(size=s), jnp.float32)}
            for i, s in enumerate(shapes)}
  paths = list(_flat_paths(params))
  plan = Plan(chain(rules([(r".*kernel", pruning.unstructured(sparsity))], paths),
                    rules([(r".*kernel", quant.weights(bits))], paths)))
  if all(s[0] == 1 for s in shapes):
    with pytest.raises(ValueError, match=r"'int\d_channel' can compress none of the"):
      plan.start(params, jax.random.PRNGKey(seed))
    return
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the [1, n] kernels the quantizer skips
    started, state = plan.start(params, jax.random.PRNGKey(seed))
    view = plan.view(started, state)
  masks = state[f"magnitude_layer_{sparsity:g}"]["masks"]
  for name, s in zip(params, shapes):
    mask = np.asarray(masks[f"{name}/kernel"])
    n = s[0] * s[1]
    assert abs((~mask).sum() - sparsity * n) <= 0.5 + 1e-9  # round(s * n) pruned
    v = np.asarray(view[name]["kernel"])
    assert (v[~mask] == 0).all()
    if s[0] == 1:  # skipped by the quantizer: the pruned weights as they are
      np.testing.assert_array_equal(v, np.asarray(started[name]["kernel"]))
    for j in range(v.shape[1]):
      assert len(np.unique(v[:, j])) <= 2 ** bits - 1
