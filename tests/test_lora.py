"""LoRA adapters on a quantized base (protocol v2: trainable factors that add to another
method's view): only the adapters move, the recovery reaches the best rank-r correction
of the quantization error (float64 SVD), the export keeps the base's codes with the
adapters beside them and the artifact computes base + (x a) b; by config, GPTQ 2-bit then
LoRA by distillation with every model parameter frozen; the bad orders and ranks."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.compress import Plan, artifact, export, flatten, formats, lora, rules, step
from mmjax.compress.post_training import rtn

K, N, R = 32, 16, 4
GRID = formats.grid("int", 2, granularity="channel")


def _apply(params, batch):
  return batch["x"] @ params["dense"]["kernel"], {}


def _frozen_base(tx):
  """The step optimizes (params, aux): params frozen, the adapters (aux) trained."""
  label = lambda tree: (jax.tree.map(lambda _: "frozen", tree[0]),
                        jax.tree.map(lambda _: "train", tree[1]))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label)


def test_adapters_recover_the_best_rank_r_correction_of_2bit_rtn(tmp_path):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(K, N)).astype(np.float32)
  x = rng.normal(size=(512, K)).astype(np.float32)
  params, batch = {"dense": {"kernel": jnp.asarray(w)}}, {"x": x, "y": x @ w}
  plan = Plan(rules([("dense/kernel", rtn.method(GRID))]),
              rules([("dense/kernel", lora.adapters(rank=R))]))
  params, cstate = plan.calibrate(lambda p, b: _apply(p, b)[0], params,
                                  plan.init(params, jax.random.PRNGKey(0)), [batch])
  q = np.asarray(plan.view(params, plan.merge(cstate, {"lora_r4": {"dense/kernel": {
      "a": jnp.zeros((K, R)), "b": jnp.zeros((R, N))}}}))["dense"]["kernel"], np.float64)
  err = w.astype(np.float64) - q  # what 2-bit rounding lost
  s = np.linalg.svd(err, compute_uv=False)
  loss_fn = lambda out, b: (jnp.mean(jnp.sum((out - b["y"]) ** 2, -1)), {})
  steps = step.build(_apply, loss_fn, _frozen_base(optax.adam(0.02)), plan)
  state = steps.init(params, jax.random.PRNGKey(1), batch)
  state = state.replace(cstate=plan.split(cstate)[1])  # the calibrated RTN scales
  train = jax.jit(steps.train_step)
  first = None
  for _ in range(400):
    state, m = train(state, batch)
    first = first if first is not None else float(m["loss"])
  # the sample covariance of x is near I: the loss is ~ ||err - scale a b||_F^2, whose
  # least value over rank-R corrections is the energy of err's other singular values
  best, start = float(np.sum(s[R:] ** 2)), float(np.sum(s ** 2))
  assert first == pytest.approx(start, rel=0.15)
  assert float(m["loss"]) < 1.15 * best and best < 0.8 * start
  np.testing.assert_array_equal(state.params["dense"]["kernel"], params["dense"]["kernel"])

  # export: the base's 2-bit codes (exactly the RTN view) with the adapters beside them
  cs = plan.merge(state.cstate, state.aux)
  view = np.asarray(plan.view(state.params, cs)["dense"]["kernel"])
  index = export.export(state.params, str(tmp_path / "e"), plan, cs)
  assert index["dense/kernel"]["bits"] == 2 and "adapter" in index["dense/kernel"]
  np.testing.assert_allclose(flatten(export.load(str(tmp_path / "e")))["dense/kernel"], view,
                             rtol=1e-5, atol=1e-5)
  bufs, meta = artifact.weights_from_export(str(tmp_path / "e"))
  base = np.asarray(artifact._base(bufs, meta["dense/kernel"]))
  np.testing.assert_array_equal(base, q.astype(np.float32))  # the codes did not move
  got = jax.jit(artifact.forward(lambda p, b: _apply(p, b)[0], meta))(bufs, batch)
  np.testing.assert_allclose(np.asarray(got), x @ view, rtol=1e-4, atol=1e-4)


def _params(workdir):
  from mmjax.harness import checkpointing
  ck = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  params = ck.restore_local(ck.latest_step())["params"]
  ck.close()
  return params


def test_bad_orders_and_ranks():
  shapes = {"dense/kernel": (K, N)}
  with pytest.raises(ValueError, match=r"'lora_r4' adds to the view of dense/kernel, but "
                     r"'rtn.*' views it later; put the adding method after"):
    Plan(rules([("dense/kernel", lora.adapters(rank=R))]),
         rules([("dense/kernel", rtn.method(GRID))])).check(shapes)
  with pytest.raises(ValueError, match=r"rank=17 is outside \[1, min\(K, N\)\] = \[1, 16\]"):
    Plan(rules([("dense/kernel", lora.adapters(rank=17))])).check(shapes)
  with pytest.raises(ValueError, match=r"LoRA rank=0 must be a positive integer"):
    lora.adapters(rank=0)


def test_gptq_2bit_then_lora_by_distillation_from_a_config(procedural_dir, tiny_dense_dir,
                                                          tmp_path):
  """post_training.py:...,lora=4 on the tiny model: GPTQ calibrates, the adapters train by
  distillation from the dense run, no model parameter moves, and the report and export
  carry the adapters."""
  from experiments.configs import post_training
  from mmjax.harness import train
  c = post_training.get_config("tiny,method=gptq,bits=2,group=32,lora=4")
  assert c.optimizer.trainable == "none" and c.train.steps == 3
  c.data.data_dir, c.mesh.data, c.init = procedural_dir, 1, tiny_dense_dir
  c.compress.distill.teacher = tiny_dense_dir
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(c, workdir, log=lambda *_: None)
  rep = json.load(open(os.path.join(workdir, "compression_report.json")))
  rows = [r for r in rep["leaves"] if r.get("adapter_rank")]
  assert rows and all(r["adapter_rank"] == 4 and r["bits"] == 2 for r in rows)
  index = export._read(os.path.join(workdir, "export"))[0]
  assert {p for p, e in index.items() if "adapter" in e} == {r["path"] for r in rows}
  assert all("grid" in index[r["path"]] for r in rows)
  # trainable="none": no model parameter moved (the GPTQ weights are what calibration
  # wrote, before the 3 steps: the final checkpoint's params equal them)
  final, dense = flatten(_params(workdir)), flatten(_params(tiny_dense_dir))
  moved = [p for p in final if not np.array_equal(final[p], dense[p])]
  assert set(moved) == {r["path"] for r in rows}  # only GPTQ's solved kernels
  bufs, meta = artifact.weights_from_export(os.path.join(workdir, "export"))
  for p in moved:  # ... and they are exactly their codes: the steps did not move them
    np.testing.assert_allclose(final[p], np.asarray(artifact._base(bufs, meta[p])), atol=1e-6)
  with pytest.raises(ValueError, match=r"steps= is the LoRA recovery's length"):
    post_training.get_config("tiny,method=gptq,steps=3")
