"""GPTQ, SparseGPT, Wanda and AWQ against independent float64 NumPy implementations written
here from the papers, on small matrices with correlated inputs (a few outlier channels, as
in transformer activations), and the properties the papers rest on: GPTQ's layer output
error below round-to-nearest's, SparseGPT's below magnitude pruning's at equal sparsity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import formats
from mmjax.compress.post_training import awq, obs, wanda


def _problem(k=72, n=24, t=512, seed=0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
  x = rng.normal(size=(t, k)) @ mix
  x[:, :3] *= 8.0  # outlier channels
  x[:, 5] = 0.0  # a dead input
  w = rng.normal(size=(k, n)) / np.sqrt(k)
  return x, w


# ------------------------------------------------------------ the NumPy reference

def np_fit(rows, bits, symmetric):
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    return np.maximum(np.abs(rows).max(0), 1e-30) / qmax, np.zeros(rows.shape[1])
  lo, hi = np.minimum(rows.min(0), 0.0), np.maximum(rows.max(0), 0.0)
  s = np.maximum(hi - lo, 1e-30) / (2 ** bits - 1)
  return s, np.round(-lo / s)


def np_round(x, s, z, bits, symmetric):
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    return np.clip(np.round(x / s), -qmax, qmax) * s
  return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def np_obs(w, h, bits=None, symmetric=True, group=None, sparsity=0.0, nm=None, damp=0.01,
           block=128, act_order=False):
  """Row-by-row OBS (GPTQ / SparseGPT) with eager updates, float64."""
  w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
  k, n = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
  g = group or k
  static = bits is not None and (group is None or act_order)
  if static:
    rs, rz = np.zeros((k, n)), np.zeros((k, n))
    for a in range(0, k, g):
      s, z = np_fit(w[a:a + g], bits, symmetric)
      rs[a:a + g], rz[a:a + g] = s, z
    rs, rz = rs[perm], rz[perm]
  w, h = w[perm], h[perm][:, perm]
  h = h + damp * np.mean(np.diag(h)) * np.eye(k)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  m = nm[1] if nm else 1
  step = (group or 1) * m // np.gcd(group or 1, m)
  b = max(step, -(-block // step) * step)
  q, keep = np.zeros((k, n)), np.ones((k, n), bool)
  for r in range(k):
    if sparsity and r % b == 0:
      rows = slice(r, min(r + b, k))
      sal = (w[rows] ** 2 / np.diag(u)[rows, None] ** 2).ravel()
      prune = np.argsort(sal, kind="stable")[:int(np.round(sparsity * sal.size))]
      blk = np.ones(sal.size, bool)
      blk[prune] = False
      keep[rows] = blk.reshape(-1, n)
    if nm and r % nm[1] == 0:
      sal = w[r:r + nm[1]] ** 2 / np.diag(u)[r:r + nm[1], None] ** 2
      rank = np.argsort(np.argsort(sal, axis=0, kind="stable"), axis=0, kind="stable")
      keep[r:r + nm[1]] = rank >= nm[1] - nm[0]
    if bits is not None:
      if static:
        s, z = rs[r], rz[r]
      elif r % g == 0:
        s, z = np_fit(w[r:r + g], bits, symmetric)
      val = np_round(w[r], s, z, bits, symmetric)
    else:
      val = w[r]
    q[r] = np.where(keep[r], val, 0.0)
    e = (w[r] - q[r]) / u[r, r]
    w[r + 1:] -= np.outer(u[r, r + 1:], e)
  inv = np.argsort(perm)
  return q[inv], keep[inv]


def out_err(x, w, wq):
  return float(np.linalg.norm(x @ w - x @ wq))


# ------------------------------------------------------------ exact agreement

CASES = {
    "gptq_w4_channel": dict(bits=4, block=16),
    "gptq_w3_group32_asym": dict(bits=3, symmetric=False, group=32, block=64, k=96),
    "gptq_w4_group32_act_order": dict(bits=4, group=32, block=32, act_order=True, k=96),
    "gptq_w4_group32_ragged": dict(bits=4, group=32, block=32, ragged=True),  # 72 = 32+32+8
    "sparsegpt_50": dict(sparsity=0.5, block=16),
    "sparsegpt_2of4_w4": dict(nm=(2, 4), bits=4, block=16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_obs_matches_float64_reference(case):
  c = dict(CASES[case])
  k = c.pop("k", 72)
  ragged = c.pop("ragged", False)
  x, w = _problem(k=k)
  h = x.T @ x
  want, want_keep = np_obs(w, h, **c)
  bits, sym, group = c.get("bits"), c.get("symmetric", True), c.get("group")
  grid = None if bits is None else formats.grid(
      "int", bits, symmetric=sym, granularity="group" if group else "channel",
      group_size=group or 128, ragged=ragged)
  with jax.enable_x64(True):
    got = obs.solve(jnp.asarray(w), jnp.asarray(h), grid=grid,
                    sparsity=c.get("sparsity", 0.0), n_m=c.get("nm"),
                    block=c.get("block", 128), act_order=c.get("act_order", False))
    got_w, got_keep, ok = np.asarray(got.w), np.asarray(got.mask), bool(got.ok)
  assert ok
  np.testing.assert_array_equal(got_keep, want_keep)
  np.testing.assert_allclose(got_w, want, rtol=1e-9, atol=1e-12)
  if bits is not None:  # on the grid it reports: rounding the result again changes nothing
    again = np.asarray(grid.round_matrix(jnp.asarray(got_w, jnp.float32), got.scale.astype(
        jnp.float32), got.zero.astype(jnp.float32)))
    np.testing.assert_allclose(again, got_w, atol=1e-6)
  if c.get("nm"):
    kept = got_keep.reshape(k // 4, 4, -1).sum(1)
    assert (kept == 2).all()
  if case not in ("gptq_w4_channel", "sparsegpt_2of4_w4"):
    return
  # float32, the dtype runs use: the same weights up to a few rounding flips
  f32 = obs.solve(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), grid=grid,
                  sparsity=c.get("sparsity", 0.0), n_m=c.get("nm"),
                  block=c.get("block", 128), act_order=c.get("act_order", False))
  assert np.mean(np.isclose(np.asarray(f32.w), want, atol=1e-4)) > 0.97


def test_gptq_beats_round_to_nearest_and_sparsegpt_beats_magnitude():
  x, w = _problem(k=128, n=64, t=1024, seed=1)
  h = jnp.asarray(x.T @ x, jnp.float32)
  wj = jnp.asarray(w, jnp.float32)
  for bits in (3, 4):
    grid = formats.grid("int", bits)
    rtn = np.asarray(grid.round_matrix(wj, *grid.fit(wj)))
    gq = np.asarray(obs.solve(wj, h, grid=grid).w)
    assert out_err(x, w, gq) < 0.8 * out_err(x, w, rtn), bits
  for s in (0.5, 0.7):
    thresh = np.sort(np.abs(w).ravel())[int(s * w.size)]
    mag = np.where(np.abs(w) >= thresh, w, 0.0)
    sg = obs.solve(wj, h, sparsity=s)
    assert abs(1 - np.asarray(sg.mask).mean() - s) < 0.01
    assert out_err(x, w, np.asarray(sg.w)) < 0.8 * out_err(x, w, mag), s
    wa = np.asarray(wanda.prune(wj, jnp.asarray((x * x).sum(0), jnp.float32), s))
    assert out_err(x, w, wa * w) < out_err(x, w, mag), s


def test_singular_hessian_is_reported():
  x, w = _problem(k=16, n=8)
  h = -np.eye(16)  # not positive definite whatever the damping
  assert not bool(obs.solve(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
                            grid=formats.grid("int", 4)).ok)


def test_wanda_matches_reference():
  x, w = _problem(k=64, n=16)
  norms = np.sqrt((x * x).sum(0))
  score = np.abs(w) * norms[:, None]
  want = np.ones_like(w, bool)
  n_prune = int(round(0.6 * w.shape[0]))
  for j in range(w.shape[1]):  # per output, over its inputs
    want[np.argsort(score[:, j], kind="stable")[:n_prune], j] = False
  got = np.asarray(wanda.prune(jnp.asarray(w, jnp.float32), jnp.asarray((x * x).sum(0),
                                                                         jnp.float32), 0.6))
  assert (got == want).mean() > 0.995  # float32 scores: ties at the threshold may flip
  nm = np.asarray(wanda.prune(jnp.asarray(w), jnp.asarray((x * x).sum(0)), 0.0, n_m=(2, 4)))
  want_nm = np.ones_like(w, bool)
  for r in range(0, 64, 4):
    order = np.argsort(score[r:r + 4], axis=0, kind="stable")[:2]
    for j in range(w.shape[1]):
      want_nm[r + order[:, j], j] = False
  np.testing.assert_array_equal(nm, want_nm)


def test_awq_search_matches_reference_and_helps():
  x, w = _problem(k=64, n=32, t=1024, seed=2)
  grid = formats.grid("int", 3, granularity="group", group_size=32)
  h = x.T @ x
  absmean = np.abs(x).mean(0)
  res = awq.search(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
                   jnp.asarray(absmean, jnp.float32), grid, n_grid=10)

  def np_err(alpha):
    s = np.maximum(absmean, 1e-4) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    ws = w * s[:, None]
    q = np.zeros_like(ws)
    for a in range(0, 64, 32):
      sc, z = np_fit(ws[a:a + 32], 3, True)
      q[a:a + 32] = np_round(ws[a:a + 32], sc, z, 3, True)
    d = w - q / s[:, None]
    return float(np.sum((h @ d) * d))

  errs = [np_err(a) for a in np.arange(11) / 10]
  assert float(res.alpha) == pytest.approx(np.argmin(errs) / 10)
  rtn = np.asarray(grid.round_matrix(jnp.asarray(w, jnp.float32),
                                     *grid.fit(jnp.asarray(w, jnp.float32))))
  got = np.asarray(res.w)
  assert out_err(x, w, got) <= out_err(x, w, rtn) + 1e-6
  assert out_err(x, w, got) == pytest.approx(np.sqrt(min(errs)), rel=1e-3)
