"""Trainable factors in the forward (protocol v2's `trains=True`), with low-rank
factorization as the method: the SVD initialization against float64 NumPy, the factors
trained by the step's optimizer (and only they move), the train state holding them once
(split out of the compression state, merged back wherever the state is read), a run by
config, and the bad ranks."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.compress import Plan, lowrank, rules, step
from mmjax.compress.protocol import TRAINABLE

K, N, R = 24, 16, 4


def _apply(params, batch):
  return batch["x"] @ params["dense"]["kernel"], {}


def _problem(seed=0):
  """A regression whose target is a rank-R map, fitted from a full-rank start."""
  rng = np.random.default_rng(seed)
  target = (rng.normal(size=(K, R)) @ rng.normal(size=(R, N))).astype(np.float32)
  w0 = rng.normal(size=(K, N)).astype(np.float32)
  x = rng.normal(size=(64, K)).astype(np.float32)
  return {"dense": {"kernel": jnp.asarray(w0)}}, {"x": x, "y": x @ target}


def test_svd_init_then_the_factors_train_and_only_they_move():
  params, batch = _problem()
  plan = Plan(rules([("dense/kernel", lowrank.factorize(rank=R))], ["dense/kernel"]))
  loss_fn = lambda out, b: (jnp.mean((out - b["y"]) ** 2), {})
  steps = step.build(_apply, loss_fn, optax.adam(0.05), plan)
  state = steps.init(params, jax.random.PRNGKey(0), batch)

  # the trainable factors live in the optimized tree, not twice
  assert set(state.aux) == {"lowrank_r4"} and TRAINABLE not in state.cstate["lowrank_r4"]
  u, s, vt = np.linalg.svd(np.asarray(params["dense"]["kernel"], np.float64))
  best = (u[:, :R] * s[:R]) @ vt[:R]  # Eckart-Young: the best rank-R approximation
  view = plan.view(params, plan.merge(state.cstate, state.aux))["dense"]["kernel"]
  np.testing.assert_allclose(np.asarray(view, np.float64), best, rtol=1e-5, atol=1e-5)
  a, b = state.aux["lowrank_r4"]["dense/kernel"].values()
  assert a.shape == (K, R) and b.shape == (R, N)

  train = jax.jit(steps.train_step)
  losses = []
  for _ in range(150):
    state, m = train(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.01 * losses[0]  # a rank-R target is reachable: the factors learn
  np.testing.assert_array_equal(state.params["dense"]["kernel"], params["dense"]["kernel"])
  # evaluation reads the trained factors (handed in as aux), and equals A @ B's forward
  f = state.aux["lowrank_r4"]["dense/kernel"]
  out, _ = steps.forward(state.params, state.cstate, batch, aux=state.aux)
  np.testing.assert_allclose(out, batch["x"] @ (f["a"] @ f["b"]), rtol=1e-5, atol=1e-5)
  # describe states the factors' bytes, from the merged state
  info = plan.describe(state.params, plan.merge(state.cstate, state.aux))["dense/kernel"]
  assert info.codes.rank == R and info.nbytes((K, N)) == (K + N) * R * 4


def test_ranks_for_energy_against_numpy():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(20, 12)) * np.geomspace(10, 0.01, 12)
  s = np.linalg.svd(w, compute_uv=False)
  for energy in (0.5, 0.9, 0.999, 1.0):
    r = lowrank.ranks_for_energy({"w": w}, energy)["w"]
    kept = np.sum(s[:r] ** 2) / np.sum(s ** 2)
    assert kept >= energy - 1e-9 and (r == 1 or np.sum(s[:r - 1] ** 2) / np.sum(s ** 2)
                                      < energy)


def test_lowrank_by_config_and_bad_ranks(procedural_dir, tiny_dense_dir, tmp_path):
  from experiments.configs import lowrank as lowrank_config
  from mmjax.harness import train

  def config(arg):
    c = lowrank_config.get_config(arg)
    c.data.data_dir, c.mesh.data, c.init = procedural_dir, 1, tiny_dense_dir
    c.train.steps = 10
    return c

  workdir = str(tmp_path / "lowrank")
  out = train.train_and_evaluate(config("tiny,rank=4"), workdir, log=lambda *_: None)
  with open(os.path.join(workdir, "compression_report.json")) as f:
    rep = json.load(f)
  import re

  from mmjax.models.family import PRUNE_PATTERN
  factored = [d for d in rep["leaves"] if re.fullmatch(PRUNE_PATTERN, d["path"])]
  assert factored and rep["accuracy"] == out["eval_accuracy"]
  for d in factored:  # the factors' bytes, as the report counts them: (K + N) * 4 floats
    assert d["compressed_bytes"] == (d["shape"][0] + d["shape"][1]) * 4 * 4, d
  # each bad rank: one line naming the setting, the path and the valid range, nothing written
  for arg, message in (("tiny,rank=0", r"config.compress.factorize.rank=0 must be >= 1"),
                       ("tiny,rank=1000", r"rank=1000 is outside \[1, min\(K, N\)\] = "
                                          r"\[1, \d+\] for its shape")):
    bad = str(tmp_path / arg.replace(",", "_"))
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(config(arg), bad, log=lambda *_: None)
    assert not os.path.exists(bad)
