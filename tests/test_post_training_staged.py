"""Sequential calibration's cut forward (`post_training/staged.py`): each level's statistics
equal those of the whole forward with the earlier levels solved (a float64 NumPy twin of
the model, written here), values that cross levels come from the cache, and the passes
together run about two forwards' worth of equations instead of one forward per level."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import flatten, layout, unflatten
from mmjax.compress.post_training import passes, staged

D = 16


def _model():
  """Two towers of three blocks and a join. In each block the second kernel's input
  depends on the first kernel (like an attention output projection), a position signal
  computed once from the batch is read by every block (a value the cache must carry), and
  the second product goes through a nested jit."""
  r = np.random.default_rng(0)
  w = lambda: r.normal(size=(D, D)) / 4
  params = {t: {f"block_{i}": {"q": w(), "o": w()} for i in range(3)} for t in "ab"}
  params["join"] = {"w": w()}
  params["head"] = {"w": r.normal(size=(D, 3)) / 4}
  proj = jax.jit(lambda a, w: a @ w)

  def apply(p, x):
    pos = jnp.sin(jnp.arange(x.shape[-1], dtype=x.dtype) * 0.3)
    out = []
    for t, h in (("a", x), ("b", x[:, ::-1])):
      h = h + pos
      for i in range(3):
        blk = p[t][f"block_{i}"]
        a = jnp.tanh(h @ blk["q"])
        h = h + proj(a, blk["o"]) + pos
      out.append(h)
    return jnp.tanh(out[0] * out[1] @ p["join"]["w"]) @ p["head"]["w"]

  def twin(p, x):
    """The same forward in float64 NumPy -> {kernel path: its input rows}."""
    pos = np.sin(np.arange(x.shape[-1]) * 0.3)
    xs, out = {}, []
    for t, h in (("a", x), ("b", x[:, ::-1])):
      h = h + pos
      for i in range(3):
        blk = p[t][f"block_{i}"]
        xs[f"{t}/block_{i}/q"] = h
        a = np.tanh(h @ blk["q"])
        xs[f"{t}/block_{i}/o"] = a
        h = h + a @ blk["o"] + pos
      out.append(h)
    xs["join/w"] = out[0] * out[1]
    return xs

  batches = [r.normal(size=(n, D)) for n in (24, 24, 16)]  # two shapes: two cut programs
  return params, apply, twin, batches


def _solved(w):
  return np.round(w * 4) / 4  # what "solved" writes in: any change of the weights will do


def test_each_level_sees_the_earlier_levels_solved_and_the_cut_runs_about_two_forwards():
  params, apply, twin, batches = _model()
  p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  b32 = [jnp.asarray(b, jnp.float32) for b in batches]
  paths = [p for p in flatten(params) if p != "head/w"]
  closed = jax.make_jaxpr(apply)(p32, b32[0])
  _, levels = passes.solve_order(apply, p32, b32[0], paths, closed=closed)
  assert [sorted(lv) for lv in levels] == [
      [f"{t}/block_{i}/{k}" for t in "ab" for k in "oq"] for i in range(3)] + [["join/w"]]
  contract_of = lambda path, ndim: layout.contract_axes(None, path, ndim)
  cut = staged.build(apply, p32, list(flatten(p32)), b32, paths, levels, ("gram", "sq"),
                     contract_of, closed)
  assert len(cut.parts) == 2  # the batch of 16 traces to a program of its own

  flat64 = flatten(params)
  current = dict(flatten(p32))
  leaves_of = lambda batch: jax.tree.leaves((unflatten(current, p32), batch))
  for lv, level in enumerate(levels):
    got = cut.stats(lv, leaves_of)
    assert sorted(got) == sorted(level)
    p64 = unflatten(flat64, params)
    xs = {}
    for b in batches:
      for k, v in twin(p64, b).items():
        xs.setdefault(k, []).append(v)
    for path in level:
      x = np.concatenate(xs[path])
      scale = np.abs(x.T @ x).max()
      np.testing.assert_allclose(got[path]["gram"], x.T @ x, rtol=0, atol=2e-6 * scale)
      np.testing.assert_allclose(got[path]["sq"], (x * x).sum(0), rtol=0, atol=2e-6 * scale)
      assert float(got[path]["count"]) == x.shape[0]
    for path in level:  # solve the level: later levels must see these weights
      flat64[path] = _solved(flat64[path])
      current[path] = jnp.asarray(flat64[path], jnp.float32)

  for part in cut.parts:
    pl = part.pl
    ran = [k for run in pl.runs for k in run]
    # every equation at most twice (once with its level dense, once final), against one
    # forward per level for the uncut program
    assert len(ran) <= 2 * len(pl.ops) < len(levels) * len(pl.ops)
    assert max(np.bincount(ran)) <= 2
    # the head comes after the last solved kernel: no statistic needs it, it never runs
    head = [k for k, op in enumerate(pl.ops) if any(
        not isinstance(x, staged._Fixed) and x in pl.leaf_ids and
        pl.leaf_ids.index(x) == list(flat64).index("head/w") for x in op.ins)]
    assert head and not set(head) & set(ran)
    # the cache is emptied of what no later level reads
    assert all(part.cache[b] == {} for b in range(len(part.batches)))


def test_a_kernel_no_product_consumes_is_named():
  params, apply, _, batches = _model()
  p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  b = jnp.asarray(batches[0], jnp.float32)
  levels = [["a/block_0/q", "a/block_0/q_missing"]]
  with pytest.raises(ValueError, match="a/block_0/q_missing.*consumed by no dot_general"):
    staged.build(apply, p32, list(flatten(p32)), [b], levels[0], levels, ("gram",),
                 lambda path, ndim: (0,))
