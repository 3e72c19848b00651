"""`python -m mmjax.cli.deploy` on mmjax runs: a W4 GPTQ run's artifact returns the compressed
model's logits for batch sizes 1, 3 and 16 from one program, its sizes land in the run's
report; a dense run deploys from its checkpoint; bad flags fail with one line. (The
combined run's artifact, lowered for cpu, cuda and tpu, is checked on the quickstart's
output in test_quickstart.py.)"""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax.cli import deploy
from mmjax.compress import export
from mmjax.data import pipeline
from mmjax.harness import family, train
from mmjax.models import MultimodalModel
from mmjax.models.family import model_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def _serve(directory):
  spec = importlib.util.spec_from_file_location("serve_deploy_test",
                                                os.path.join(directory, "serve.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.load(directory)


def test_gptq_w4_run_deploys_and_serves_its_logits(procedural_dir, tiny_dense_dir, tmp_path):
  from experiments.configs import post_training
  c = post_training.get_config("tiny,method=gptq,bits=4,group=32,parallel")
  c.data.data_dir, c.mesh.data, c.init = procedural_dir, 1, tiny_dense_dir
  workdir = str(tmp_path / "gptq4")
  train.train_and_evaluate(c, workdir, log=lambda *_: None)
  out = str(tmp_path / "artifact")
  res = deploy.build(workdir, out, platforms=("cpu",), log=lambda *_: None)
  sizes = res["sizes"]
  # the export's buffers, raw (the export is zstd'd by Orbax): no dense copy
  assert sizes["weights_bytes"] < 1.1 * sizes["export_bytes"] < sizes["dense_fp32_bytes"] / 2
  rep = json.load(open(os.path.join(workdir, "compression_report.json")))
  assert rep["artifact"]["artifact_bytes"] == sizes["artifact_bytes"] and rep["artifact"][
      "platforms"] == ["cpu"]

  model = _serve(out)
  assert set(model.inputs) == {"text", "text_mask", "image", "audio", "audio_mask"}
  assert model.inputs["image"]["shape"][0] == "batch"
  # the compressed model in process: the export's weights in mmjax's model
  net = MultimodalModel(model_config(family.from_config(c)))
  view = export.load(os.path.join(workdir, "export"))
  batch = {k: np.asarray(v[:16]) for k, v in
           next(iter(pipeline.eval_batches(train.input_config(c, family.from_config(c))))).items()}
  # one compiled forward of 16 examples; each example's logits depend on it alone
  want = np.asarray(jax.jit(net.apply)({"params": view}, batch)[0])
  for n in (1, 3, 16):
    got = model({k: v[:n] for k, v in batch.items()})
    np.testing.assert_allclose(np.asarray(got), want[:n], rtol=1e-5, atol=1e-5)


def test_dense_run_deploys_from_its_checkpoint_and_bad_flags_fail(tiny_dense_dir, tmp_path):
  out = str(tmp_path / "dense_artifact")
  res = deploy.build(tiny_dense_dir, out, platforms=("cpu",), log=lambda *_: None)
  assert res["manifest"]["source"].endswith("(checkpoint step 30)")
  assert res["sizes"]["weights_bytes"] < res["sizes"]["dense_fp32_bytes"] + 1024  # one buffer
  assert not os.path.exists(os.path.join(tiny_dense_dir, "compression_report.json"))
  with pytest.raises(ValueError, match="no config.json"):
    deploy.build(str(tmp_path), str(tmp_path / "x"), platforms=("cpu",))
  r = subprocess.run([sys.executable, "-m", "mmjax.cli.deploy", f"--workdir={tiny_dense_dir}",
                      f"--out={tmp_path / 'y'}", "--platforms=cpu,gpu"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "platforms ['gpu'] unknown; valid: cpu, cuda, rocm, tpu" in (
      r.stderr.strip().splitlines()[-1]), r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "y")
