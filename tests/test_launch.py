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
