"""`python -m experiments.quickstart --tiny` end to end: dense, then the combined pipeline
(self-distillation + gradual pruning + int8 QAT, exported), the report, the comparison
table and the plot; a rerun reuses both finished stages."""
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def _quickstart(workdir, data_dir):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  return subprocess.run([sys.executable, "-m", "experiments.quickstart", "--tiny",
                         f"--workdir={workdir}", f"--data_dir={data_dir}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_quickstart_end_to_end_then_reuses_its_stages(procedural_dir, tmp_path):
  workdir = str(tmp_path / "qs")
  r = _quickstart(workdir, procedural_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "[quickstart] dense vs compressed" in r.stdout and "TOTAL" in r.stdout
  report = json.load(open(os.path.join(workdir, "compressed", "compression_report.json")))
  # self-distillation from the dense run + pruning + int8, exported and measured on disk
  assert report["disk_ratio"] > 6.0 and os.path.isdir(report["export_dir"])
  assert all(m in report["plan"] for m in ("magnitude", "int8", "distill"))
  assert report["total"]["sparsity"] > 0.5
  config = json.load(open(os.path.join(workdir, "compressed", "config.json")))
  assert config["compress"]["distill"]["teacher"] == "init"
  assert config["init"] == os.path.join(workdir, "dense")
  with open(os.path.join(workdir, "pareto.png"), "rb") as f:
    assert f.read(4) == b"\x89PNG"
  # the compressed run as an artifact for cpu, cuda and tpu; on this CPU, loaded by its own
  # serve.py, it classifies the test split exactly as the run did
  env = {**os.environ, "XLA_FLAGS": "", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  d = subprocess.run([sys.executable, "-m", "mmjax.cli.deploy", f"--workdir={workdir}/compressed",
                      f"--out={workdir}/artifact", "--evaluate", f"--data_dir={procedural_dir}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert d.returncode == 0, d.stderr[-3000:]
  manifest = json.load(open(os.path.join(workdir, "artifact", "manifest.json")))
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  acc = f"{report['accuracy']:.2%}"
  assert f"artifact test accuracy {acc} on 1000 examples (the run: {acc})" in d.stdout, d.stdout
  again = _quickstart(workdir, procedural_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("already done") == 2 and "dense vs compressed" in again.stdout
