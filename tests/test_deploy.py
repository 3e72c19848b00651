"""`python -m mmjax.cli.deploy` on mmjax runs: the artifact of a run with token merging,
2:4 sparsity and 4-bit weights returns the compressed model's logits (ToMe's merges
included) for batch sizes 1, 3 and 16 from one program, its sizes land in the run's
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


def test_token_merging_2_4_and_w4_deploy_and_serve_their_logits(procedural_dir, tiny_dense_dir,
                                                                tmp_path):
  """One plan: ToMe in the image and audio towers, and SparseGPT's joint pass (2:4 pruning
  with the kept weights rounded to a 4-bit grid, GPTQ's update)."""
  from experiments.configs import post_training
  from experiments.configs.common import section
  c = post_training.get_config("tiny,method=sparsegpt,nm=2:4,joint,bits=4,group=32,parallel")
  c.compress.tokens = section("tome", r=3)
  c.data.data_dir, c.mesh.data, c.init = procedural_dir, 1, tiny_dense_dir
  workdir = str(tmp_path / "tome_24_w4")
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
  # the compressed model in process: the export's weights in mmjax's model, with ToMe's
  # hooks (the image tower's 16 tokens leave as 13)
  from mmjax.compress import Plan
  from mmjax.compress.token_merge import merge_tokens
  net = MultimodalModel(model_config(family.from_config(c)))
  view = export.load(os.path.join(workdir, "export"))
  batch = {k: np.asarray(v[:16]) for k, v in
           next(iter(pipeline.eval_batches(train.input_config(c, family.from_config(c))))).items()}
  tome = Plan(merge_tokens(3, r"(?:image|audio)/block_\d+", tower="(?:image|audio)"))
  apply = tome.wrap(lambda p, b: net.apply({"params": p}, b), {}, list(view))
  # one compiled forward of 16 examples; each example's logits depend on it alone
  want, inter = jax.jit(apply)(view, batch)
  assert inter["image"]["final"].shape[1] == 13
  want = np.asarray(want)
  assert np.abs(want - np.asarray(jax.jit(net.apply)({"params": view}, batch)[0])).max() > 1e-4
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
