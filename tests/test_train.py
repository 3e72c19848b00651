"""The experiment harness: the loop, exact resume after SIGKILL, devices, bad input."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import dense
from mmjax.compress import export
from mmjax.data.pipeline import InputConfig, train_iterator
from mmjax.harness import checkpointing, optim, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(data_dir, **train_overrides):
  """The tiny dense config on one device (fast); the device tests ask for more."""
  c = dense.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.data = 1
  c.train.update(train_overrides)
  return c


def _quiet(*_):
  pass


def _load_final(workdir):
  """(latest step, its train state as saved: nested dicts of arrays)."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  step = ckpt.latest_step()
  state = ckpt.restore_local(step)
  ckpt.close()
  return step, state


# ----------------------------------------------------------------------------- the loop

def test_tiny_run_trains_evaluates_and_writes_everything(procedural_dir, tmp_path):
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(_tiny(procedural_dir, eval_every=15), workdir, log=_quiet)
  for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert summary["step"] == 30 and summary["eval_examples"] == 1000  # every test example
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rec = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train_rec] == [5, 10, 15, 20, 25, 30]
  for key in ("train/accuracy", "train/lr", "train/grad_norm", "train/param_norm",
              "train/update_norm", "train/steps_per_s"):
    assert key in train_rec[0]
  assert [r["step"] for r in records if "eval/accuracy" in r] == [15, 30]
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit()) == [20, 30]  # keep_checkpoints=2
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 30


def test_init_from_another_run(procedural_dir, tiny_dense_dir, tmp_path):
  cfg = _tiny(procedural_dir, steps=1)
  cfg.init = tiny_dense_dir  # the shared tiny dense run, not trained again here
  cfg.optimizer.lr = 1e-12
  logs = []
  train.train_and_evaluate(cfg, str(tmp_path / "b"), log=logs.append)
  assert any("[init] params from" in l for l in logs)
  _, sa = _load_final(tiny_dense_dir)
  _, sb = _load_final(str(tmp_path / "b"))
  for x, y in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(procedural_dir, tiny_dense_dir,
                                                           tmp_path):
  workdir = str(tmp_path / "nan")
  shutil.copytree(tiny_dense_dir, workdir)  # a finished 30-step run (the shared one)
  cfg = _tiny(procedural_dir, steps=200, checkpoint_every=2, log_every=100, eval_every=1000)
  cfg.optimizer.update(lr=1e30, clip_norm=0.0, warmup_steps=0, schedule="constant")
  with pytest.raises(train.NonFiniteLossError, match="The last good checkpoint .step 3[0-9]"):
    train.train_and_evaluate(cfg, workdir, log=_quiet)  # resumes at 30, then diverges
  step, state = _load_final(workdir)
  assert 30 <= step < 200
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


# ----------------------------------------------------------------------------- exact resume

# gradual pruning (masks recomputed every 10 steps until 40) + int8 QAT + distillation
# from a dense teacher, from scratch: the compression state must resume as exactly as the
# weights
COMPRESSED = ("--config=experiments/configs/combined.py:tiny", "--config.init=",
              "--config.compress.prune.ramp.end=40",
              "--config.compress.prune.ramp.every=10")


CLI_STEPS = 40  # killed soon after step 10: the resumed run recomputes the masks at 20-40


def _cli(workdir, data_dir, *extra, config="--config=experiments/configs/dense.py:tiny"):
  env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.main", *((config,) if isinstance(config, str)
                                                    else config),
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
       f"--config.train.steps={CLI_STEPS}", "--config.train.checkpoint_every=10",
       "--config.train.eval_every=1000", "--config.train.log_every=10",
       "--config.mesh.data=1", *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_and_resume_is_bit_identical(procedural_dir, tiny_dense_dir, tmp_path):
  """The whole harness (params, Adam state, rng, data position) and the compression state
  (pruning masks recomputed every 10 steps, int8 QAT, distillation's trainable projection
  and frozen teacher) resume exactly: the dense loop is the same code with an empty plan."""
  config = COMPRESSED + (f"--config.compress.distill.teacher={tiny_dense_dir}",)
  def wait_for_a_checkpoint(proc, workdir):
    deadline = time.time() + 240
    while time.time() < deadline:
      ck = workdir / "checkpoints"
      if ck.exists() and any(p.name.isdigit() for p in ck.iterdir()):
        return
      assert proc.poll() is None, proc.stdout.read()
      time.sleep(0.05)

  straight = _cli(str(tmp_path / "straight"), procedural_dir, config=config)
  # the victim starts once the straight run has compiled (and cached) its train step, so
  # the two do not compile the same program side by side on the CI machine's two cores
  wait_for_a_checkpoint(straight, tmp_path / "straight")
  killed_dir = tmp_path / "killed"
  victim = _cli(str(killed_dir), procedural_dir, config=config)
  wait_for_a_checkpoint(victim, killed_dir)
  time.sleep(random.uniform(0.0, 0.5))
  assert victim.poll() is None, "the run ended before it could be killed"
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  out = straight.communicate(timeout=300)[0]
  assert straight.returncode == 0, out
  steps = sorted(int(p.name) for p in (killed_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] < CLI_STEPS, f"killed run left checkpoints {steps}"
  resumed = _cli(str(killed_dir), procedural_dir, config=config)
  out = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0, out
  assert f"resumed from {killed_dir / 'checkpoints'} at step {steps[-1]}" in out
  sa, a = _load_final(str(tmp_path / "straight"))
  sb, b = _load_final(str(killed_dir))
  assert sa == sb == CLI_STEPS
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical
  if config[0] == COMPRESSED[0]:  # the masks really were part of what resumed
    assert "distill" in a["cstate"] and "int8_channel" in a["cstate"]
    masks = a["cstate"]["magnitude_layer_0.9"]["masks"]
    assert 0.85 < 1 - np.mean([np.asarray(m).mean() for m in masks.values()]) < 0.95
  ea = json.load(open(tmp_path / "straight" / "summary.json"))
  eb = json.load(open(killed_dir / "summary.json"))
  assert ea["eval_accuracy"] == eb["eval_accuracy"] and ea["eval_loss"] == eb["eval_loss"]


# orbax's readers of the truncated file end with an exception the event loop reports
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_after_the_final_checkpoint_and_past_an_unreadable_step(procedural_dir,
                                                                       tmp_path):
  """Killed after its final checkpoint but before its final evaluation, a run resumes to
  the same summary and report; a truncated newest checkpoint is set aside and the run
  resumes from the one before, ending bit-identical to the uninterrupted run."""
  from experiments.configs import prune_qat
  c = prune_qat.get_config("tiny,sparsity=0.5")
  c.init, c.data.data_dir, c.mesh.data = None, procedural_dir, 1
  c.train.update(steps=20, checkpoint_every=10, eval_every=10, keep_checkpoints=3)
  workdir = tmp_path / "run"
  train.train_and_evaluate(c, str(workdir), log=_quiet)
  summary = json.load(open(workdir / "summary.json"))
  report = json.load(open(workdir / "compression_report.json"))
  # pruning + int8 QAT reported per leaf: masked int8 kernels, the head int8 and unmasked,
  # int8 everywhere (norm scales too), more than 3x smaller than fp32 on disk
  rows = {r["path"]: r for r in report["leaves"]}
  k = rows["image/block_00/mlp/fc1/kernel"]
  assert k["bits"] == 8 and k["sparsity"] >= 0.5 - 1 / k["size"]
  assert rows["head/kernel"]["bits"] == 8 and not rows["head/kernel"]["masked"]
  assert rows["image/block_00/ln_mlp/scale"]["bits"] == 8
  assert report["total"]["ratio"] > 3.0
  _, final = _load_final(str(workdir))
  for name in ("summary.json", "compression_report.json"):  # as if killed before them
    os.remove(workdir / name)
  first_export = export.load(str(workdir / "export"))
  train.train_and_evaluate(c, str(workdir), log=_quiet)
  again = json.load(open(workdir / "summary.json"))
  assert again["eval_accuracy"] == summary["eval_accuracy"] is not None
  assert again["eval_loss"] == summary["eval_loss"] and again["steps_run"] == 0
  rep = json.load(open(workdir / "compression_report.json"))
  assert rep["accuracy"] == report["accuracy"] is not None
  assert rep["total"] == report["total"]
  # the same weights exported again: identical contents; the bytes differ only by Orbax's
  # container (timestamps, OCDBT node layout: hundreds of bytes of ~67 KB)
  second_export = export.load(str(workdir / "export"))
  assert jax.tree.structure(first_export) == jax.tree.structure(second_export)
  for x, y in zip(jax.tree.leaves(first_export), jax.tree.leaves(second_export)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert abs(rep["disk_bytes"] - report["disk_bytes"]) < 0.02 * report["disk_bytes"]

  step_dir = workdir / "checkpoints" / "20"
  victim = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # truncated
  logs = []
  train.train_and_evaluate(c, str(workdir), log=logs.append)
  assert any("step 20" in l and "unreadable" in l for l in logs), logs
  assert any("resumed from" in l and "at step 10" in l for l in logs)
  assert (workdir / "checkpoints" / "20.corrupt").is_dir()  # set aside, never deleted
  _, resumed = _load_final(str(workdir))
  assert jax.tree.structure(resumed) == jax.tree.structure(final)
  for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert json.load(open(workdir / "summary.json"))["eval_accuracy"] == summary["eval_accuracy"]


# ----------------------------------------------------------------------------- devices

def test_one_step_on_8_devices_equals_1_device(procedural_dir, cpu_devices):
  """Two steps on 8 devices with FSDP (the batch and the parameters sharded) equal two steps
  on one. Plain data parallelism (the parameters replicated) is the same batch sharding
  without the parameter specs: test_two_processes_on_localhost_match_one_process runs it
  end to end on 4 devices."""
  cfg = _tiny(procedural_dir)
  setup = train.validate(cfg)
  fam = setup.family
  tx, lr_schedule = optim.make_optimizer(cfg.optimizer, 30)
  local = next(train_iterator(InputConfig(data_dir=procedural_dir, batch_size=16)))
  sample = fam.example_batch(1)
  steps = train.make_steps(fam, setup.task, tx, lr_schedule)
  init_fn = lambda: steps.init(fam.init(jax.random.PRNGKey(1), sample),
                               jax.random.PRNGKey(0), sample)
  results = {}
  for n, fsdp in ((1, False), (8, True)):
    mesh = sharding.make_mesh(n)
    shd = sharding.state_shardings(jax.eval_shape(init_fn), mesh, fsdp)
    state = jax.jit(init_fn, out_shardings=shd)()
    batch = sharding.global_batch(train.model_inputs(local, fam, setup.task),
                                  sharding.batch_sharding(mesh))
    step = jax.jit(steps.train_step, in_shardings=(shd, sharding.batch_sharding(mesh)),
                   out_shardings=(shd, None))
    for _ in range(2):
      state, metrics = step(state, batch)
    results[n, fsdp] = (jax.device_get(state.params), float(metrics["loss"]))
    if fsdp:
      specs = [s.spec for s in jax.tree.leaves(shd.params)]
      assert any(sharding.AXIS in tuple(sp) for sp in specs), "FSDP sharded nothing"
  # Compared as whole trees: 8 devices reduce in another order, and Adam turns the float
  # noise of mathematically-zero gradients (attention key biases) into lr-sized steps.
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  (one, loss_one), (eight, loss_eight) = results[1, False], results[8, True]
  assert abs(loss_one - loss_eight) < 1e-5
  a, b = flat(one), flat(eight)
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5


# ----------------------------------------------------------------------------- bad input

def _main(*args):
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_cli_flag_errors(tmp_path):
  wd = str(tmp_path / "wd")
  r = _main("--config=experiments/configs/nope.py", f"--workdir={wd}")
  assert r.returncode != 0 and "nope.py" in r.stderr
  r = _main("--config=experiments/configs/dense.py:huge", f"--workdir={wd}")
  assert r.returncode != 0 and "unknown config argument 'huge'; valid: ['tiny']" in r.stderr
  r = _main("--config=experiments/configs/dense.py:tiny", f"--workdir={wd}",
            "--config.train.steps=abc")
  assert r.returncode != 0 and "config.train.steps" in r.stderr
  r = _main("--config=experiments/configs/dense.py:tiny", f"--workdir={wd}",
            "--config.train.stepz=3")
  assert r.returncode != 0 and "stepz" in r.stderr
  assert not os.path.exists(wd), "a failed start must not create the workdir"


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: (c.mesh.update(data=8), c.data.update(batch_size=12)),
     "not divisible by the 8 devices"),
    (lambda c: c.train.update(steps=0), "config.train.steps=0"),
    (lambda c: c.optimizer.update(name="adamz"), "not an optax optimizer"),
    (lambda c: c.optimizer.update(momentum=0.9), "which optax.adamw does not take"),
    (lambda c: c.model.update(num_heads=3), "'num_heads' = 3"),
    (lambda c: c.mesh.update(data=16), "16 devices asked, 8 available"),
])
def test_config_errors_before_compilation(procedural_dir, tmp_path, mutate, needle):
  cfg = _tiny(procedural_dir)
  mutate(cfg)
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(cfg, str(tmp_path / "wd"), log=_quiet)
  assert needle in str(err.value)
  assert not (tmp_path / "wd").exists()


def test_unwritable_workdir(procedural_dir):
  with pytest.raises(ValueError, match="is not writable"):
    train.train_and_evaluate(_tiny(procedural_dir), "/proc/mmjax_run", log=_quiet)


def test_checkpoint_that_does_not_fit_leaves_the_workdir_untouched(procedural_dir, tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(_tiny(procedural_dir, steps=10), str(workdir), log=_quiet)
  before = {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")}
  cfg = _tiny(procedural_dir, steps=20)
  cfg.model.d_model = 64
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    train.train_and_evaluate(cfg, str(workdir), log=_quiet)
  assert "params/" in str(err.value) and "config.json" in str(err.value)
  assert {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_optimizer_by_name():
  import ml_collections
  tx, sched = optim.make_optimizer(ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, schedule="warmup_linear", warmup_steps=2,
      clip_norm=0.0)), 10)
  assert float(sched(0)) == 0.0 and abs(float(sched(2)) - 0.1) < 1e-7
  assert float(sched(10)) == 0.0


# ----------------------------------------------------------------------------- multi-host

def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_match_one_process(procedural_dir, tmp_path):
  """Two CPU processes x 2 devices (gloo collectives) == one process x 4 devices."""
  args = [sys.executable, "-m", "experiments.main", "--config=experiments/configs/dense.py:tiny",
          f"--config.data.data_dir={procedural_dir}", "--config.train.steps=6",
          "--config.train.eval_every=1000", "--config.train.log_every=3",
          "--config.train.checkpoint_every=6"]
  base = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  port = _free_port()
  procs = [subprocess.Popen(args + [f"--workdir={tmp_path / 'multi'}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                                 "MMJAX_DISTRIBUTED": "1",
                                 "MMJAX_COORDINATOR": f"127.0.0.1:{port}",
                                 "MMJAX_NUM_PROCESSES": "2", "MMJAX_PROCESS_ID": str(i)})
           for i in range(2)]
  single = subprocess.run(args + [f"--workdir={tmp_path / 'single'}"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert single.returncode == 0, single.stdout + single.stderr
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert "4 device(s) (cpu, 2 process(es))" in outs[0]
  a = json.load(open(tmp_path / "multi" / "summary.json"))
  b = json.load(open(tmp_path / "single" / "summary.json"))
  assert a["eval_examples"] == b["eval_examples"] == 1000  # each test example once
  assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4
  _, sa = _load_final(str(tmp_path / "multi"))
  _, sb = _load_final(str(tmp_path / "single"))
  # Reductions run in another order across processes, and Adam turns the float noise of
  # mathematically-zero gradients (attention key biases) into lr-sized steps, so compare
  # the parameters as a whole: relative distance of the two trees.
  xa = np.concatenate([np.ravel(x) for x in jax.tree.leaves(sa["params"])])
  xb = np.concatenate([np.ravel(x) for x in jax.tree.leaves(sb["params"])])
  assert np.linalg.norm(xa - xb) / np.linalg.norm(xb) < 1e-4
