"""LSQ, learned step sizes (a `trains=True` method): the forward and both gradients
against the paper's formulas in float64 NumPy, the step sizes trained by the step's
optimizer, and a run by config (qat.py:lsq)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.compress import Plan, lsq, rules, step
from mmjax.compress.protocol import TRAINABLE


def test_forward_and_gradients_are_the_papers():
  bits, q = 3, 3  # 2**(3-1) - 1
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 5)).astype(np.float32)
  s = (0.2 + 0.3 * rng.random((1, 5))).astype(np.float32)  # per output channel
  c = rng.normal(size=(6, 5)).astype(np.float32)
  f = lambda w, s: jnp.sum(lsq.quantize(w, s, bits, (0,)) * c)
  gw, gs = jax.grad(f, argnums=(0, 1))(w, s)

  v = w.astype(np.float64) / s
  inside = np.abs(v) < q
  np.testing.assert_allclose(lsq.quantize(w, s, bits, (0,)),
                             s * np.round(np.clip(v, -q, q)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gw, np.where(inside, c, 0.0), rtol=1e-6, atol=1e-6)
  g = 1.0 / math.sqrt(6 * q)  # the paper's gradient scale: 6 weights per step size
  ds = np.where(inside, np.round(v) - v, np.sign(v) * q)
  np.testing.assert_allclose(gs, g * np.sum(c * ds, axis=0, keepdims=True), rtol=1e-5,
                             atol=1e-6)


def test_step_sizes_train_and_beat_min_max_scales_at_2_bits():
  """The same weights fine-tuned at 2 bits (the grid -s, 0, s per channel): with learned
  step sizes the fit ends well below min-max QAT's (s = max|w|, not learned)."""
  from mmjax.compress import quant
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 16)).astype(np.float32)
  target = rng.normal(size=(16, 8)).astype(np.float32)
  params = {"dense": {"kernel": jnp.asarray(target + 0.1 * rng.normal(size=(16, 8)),
                                             jnp.float32)}}
  batch = {"x": x, "y": x @ target}
  apply = lambda p, b: (b["x"] @ p["dense"]["kernel"], {})
  loss_fn = lambda out, b: (jnp.mean((out - b["y"]) ** 2), {})
  final = {}
  for name, method in (("lsq", lsq.lsq(2)), ("min-max", quant.weights(2))):
    plan = Plan(rules([("dense/kernel", method)], ["dense/kernel"]))
    steps = step.build(apply, loss_fn, optax.adam(0.003), plan)
    state = steps.init(params, jax.random.PRNGKey(0), batch)
    if name == "lsq":  # the paper's initialization: 2 mean|w| / sqrt(Q), Q = 1
      s0 = np.asarray(state.aux["lsq2_channel"]["dense/kernel"])
      np.testing.assert_allclose(s0, 2 * np.mean(np.abs(params["dense"]["kernel"]), 0,
                                                 keepdims=True), rtol=1e-6)
      assert TRAINABLE not in state.cstate["lsq2_channel"]
    train = jax.jit(steps.train_step)
    for _ in range(200):
      state, m = train(state, batch)
    final[name] = float(m["loss"])
    if name == "lsq":
      assert not np.allclose(state.aux["lsq2_channel"]["dense/kernel"], s0)
  assert final["lsq"] < 0.7 * final["min-max"], final


def test_lsq_by_config(procedural_dir, tiny_dense_dir, tmp_path):
  from experiments.configs import qat
  from mmjax.harness import train
  c = qat.get_config("tiny,lsq,bits=4")
  c.data.data_dir, c.mesh.data, c.init, c.train.steps = procedural_dir, 1, tiny_dense_dir, 10
  workdir = str(tmp_path / "lsq")
  out = train.train_and_evaluate(c, workdir, log=lambda *_: None)
  with open(os.path.join(workdir, "compression_report.json")) as f:
    rep = json.load(f)
  four = [d for d in rep["leaves"] if d["bits"] == 4]
  assert len(four) > 20 and rep["accuracy"] == out["eval_accuracy"]
  assert rep["plan"].startswith(".*:lsq4_channel")
