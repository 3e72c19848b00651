"""launch.sh: usage and exit codes (the commands that install are exercised by CI itself)."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, cwd="/"):
  return subprocess.run([os.path.join(ROOT, "launch.sh"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=60)


def test_help_from_any_directory():
  for args in ((), ("help",)):
    r = _launch(*args)
    assert r.returncode == 0
    assert "quickstart" in r.stdout and "test" in r.stdout


def test_unknown_command_prints_usage_and_exits_2():
  r = _launch("frobnicate")
  assert r.returncode == 2
  assert "unknown command 'frobnicate'" in r.stderr and "usage:" in r.stderr


def test_gpu_dry_run_prints_the_command():
  r = _launch("gpu", "--dry-run", "--config=experiments/configs/dense.py", "--workdir=/tmp/x")
  assert r.returncode == 0
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in r.stdout
  assert "-m experiments.main --config=experiments/configs/dense.py --workdir=/tmp/x" in r.stdout


def test_tpu_dry_run_runs_train_on_every_worker():
  r = _launch("tpu", "my-tpu", "us-central2-b", "--dry-run",
              "--config=experiments/configs/dense.py", "--workdir=gs://b/run")
  assert r.returncode == 0
  out = r.stdout
  assert out.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all")
  assert "MMJAX_DISTRIBUTED=1" in out and "./launch.sh\\ train" in out
  assert "--workdir=gs://b/run" in out
  r = _launch("tpu", "only-name")
  assert r.returncode == 2 and "usage: ./launch.sh tpu" in r.stderr
