"""The harness knows no model: a model module and a task module written outside the package
(tests/toy_family.py, tests/toy_task.py: a conv-stem image classifier ranked by top-3
accuracy) go through every experiment entry point by config alone (tests/toy_config.py):
training from the command line, a start from the family's own checkpoint format, int8
fine-tuning, one-shot GPTQ, sensitivity and the allocator, deploy, and lowering for GPU and
TPU. Bad model and task modules fail in one line before any work."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax.cli import deploy, lowering
from mmjax.compress import flatten
from mmjax.data import pipeline
from mmjax.harness import checkpointing, family, train

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
QUIET = lambda *_: None


def _config(arg, data_dir, init=None):
  import toy_config
  c = toy_config.get_config(arg)
  c.data.data_dir, c.mesh.data = data_dir, 1
  if init:
    c.init = init
  return c


def _env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      [TESTS, ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def _top3_and_loss_float64(logits, labels, smoothing=0.1):
  """The toy task's metrics, written again in float64 NumPy."""
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  n_cls = logits.shape[-1]
  target = np.eye(n_cls)[labels] * (1 - smoothing) + smoothing / n_cls
  loss = -(target * logp).sum(-1)
  rank = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(-1)
  return float((rank < 3).mean()), float(loss.mean())


def test_a_model_and_task_outside_the_package_through_every_entry_point(procedural_dir,
                                                                         tmp_path):
  dense = str(tmp_path / "dense")
  r = subprocess.run([sys.executable, "-m", "experiments.main", "--config",
                      os.path.join(TESTS, "toy_config.py"), f"--workdir={dense}",
                      f"--config.data.data_dir={procedural_dir}", "--config.mesh.data=1"],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.load(open(os.path.join(dense, "summary.json")))
  assert {"eval_top3", "eval_loss"} <= set(summary) and "eval_accuracy" not in summary

  # the run's evaluation, recomputed: its checkpoint through the family, metrics in float64
  config = _config(None, procedural_dir)
  fam = family.from_config(config)
  params = checkpointing.restore_params_from(dense, fam.abstract_params())
  logits, labels = [], []
  for b in pipeline.eval_batches(train.input_config(config, fam)):
    keep = np.asarray(b["example_mask"], bool)
    logits.append(np.asarray(jax.jit(fam.apply)(params, b)[0])[keep])
    labels.append(np.asarray(b["label"])[keep])
  top3, loss = _top3_and_loss_float64(np.concatenate(logits), np.concatenate(labels))
  assert summary["eval_examples"] == len(np.concatenate(labels)) == 1000
  assert summary["eval_top3"] == pytest.approx(top3, abs=1e-6)
  assert summary["eval_loss"] == pytest.approx(loss, rel=1e-4)

  # config.init from the family's own format (an .npz of flat paths): int8 W8A8 QAT
  npz = str(tmp_path / "toy_weights.npz")
  np.savez(npz, **{p: np.asarray(w) for p, w in flatten(params).items()})
  qat = str(tmp_path / "int8")
  out = train.train_and_evaluate(_config("int8", procedural_dir, npz), qat, log=QUIET)
  assert out["step"] == 10 and "eval_top3" in out
  rep = json.load(open(os.path.join(qat, "compression_report.json")))
  assert rep["activations"]["layers"] == 4  # the family's default activation kernels
  assert rep["dense_accuracy"] is None  # an .npz has no summary.json
  broken = str(tmp_path / "broken.npz")
  np.savez(broken, **{p: np.asarray(w) for p, w in flatten(params).items()
                      if p != "head/kernel"})
  with pytest.raises(ValueError, match="missing from the checkpoint.*head/kernel"):
    train.train_and_evaluate(_config("int8", procedural_dir, broken), str(tmp_path / "x"),
                             log=QUIET)
  assert not os.path.exists(str(tmp_path / "x" / "checkpoints"))

  # one-shot GPTQ of the family's default kernels; its report ranks by the task's metric
  gptq = str(tmp_path / "gptq")
  out = train.train_and_evaluate(_config("gptq", procedural_dir, dense), gptq, log=QUIET)
  rep = json.load(open(os.path.join(gptq, "compression_report.json")))
  assert rep["accuracy"] == out["eval_top3"] and rep["dense_accuracy"] == summary["eval_top3"]
  four_bit = sorted(d["path"] for d in rep["leaves"] if d["bits"] == 4)
  assert four_bit == [f"block_{i}/{k}/kernel" for i in (0, 1) for k in ("down", "up")]

  # the artifact serves the GPTQ model; evaluated by the run's task, it scores as the run
  art = str(tmp_path / "artifact")
  res = deploy.build(gptq, art, platforms=("cpu",), log=QUIET)
  assert res["manifest"]["modalities"] == ["image"] and res["manifest"]["labels"][0] == "class 0"
  ev = deploy.evaluate(gptq, art, log=QUIET)
  assert ev["top3"] == pytest.approx(out["eval_top3"], abs=1.5 / 1000)
  assert ev["run_top3"] == out["eval_top3"]

  # sensitivity and the allocator: the family's kernels, unit types and towers
  from experiments import sensitivity
  sens = sensitivity.run(dense, str(tmp_path / "sens"), method="gptq",
                         settings=("w2c", "w8c"), budgets=("w8c",), calib_examples=32,
                         val_examples=64, log=QUIET)
  assert sorted(sens["layers"]) == four_bit and sorted(sens["types"]) == ["down", "up"]
  assert sorted(sens["towers"]) == ["block_0", "block_1"]
  worse = lambda s: sum(abs(r[s]["d_loss"]) for r in sens["layers"].values())
  assert worse("w8c") < worse("w2c")
  assert os.path.exists(os.path.join(tmp_path, "sens", "allocation_w8c.json"))

  # the int8 training and evaluation steps lower for GPU and TPU, shapes only
  low = lowering.check(_config("int8", procedural_dir, dense), log=QUIET)
  assert low and all(v is None for v in low.values()), low


@pytest.mark.parametrize("field,value,message", [
    ("model_module", "no_such_module_anywhere", "cannot be imported.*ModuleNotFoundError"),
    ("model_module", "toy_task", "has no family\\(\\) function"),
    ("task_module", "no_such_task_module", "config.task_module='no_such_task_module' cannot"),
    ("task_module", "toy_family", "has no task\\(\\) function"),
    ("model.width", -1, "width=-1 must be > 0"),
    ("init", "/nonexistent/weights.npz", "no such file or directory"),
])
def test_bad_model_or_task_modules_fail_before_any_work(procedural_dir, field, value,
                                                        message):
  config = _config(None, procedural_dir)
  if "." in field:
    config.model[field.split(".")[1]] = value
  else:
    config[field] = value
  with pytest.raises(ValueError, match=message):
    train.validate(config)


def test_a_bad_model_module_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
  workdir = str(tmp_path / "never")
  r = subprocess.run([sys.executable, "-m", "experiments.main", "--config",
                      os.path.join(TESTS, "toy_config.py"), f"--workdir={workdir}",
                      "--config.model_module=my_lab.models.nothing"],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and not os.path.exists(workdir)
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and "config.model_module='my_lab.models.nothing'" in err[0], r.stderr
