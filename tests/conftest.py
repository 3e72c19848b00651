"""Test setup: 8 fake CPU devices (set before JAX is imported) and fast compiles."""
import atexit
import os
import shutil
import tempfile

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA cache per session, in a fresh directory removed at exit. The tiny runs
# compile the same programs over and over: in this process, in the xdist workers and in
# the CLI subprocesses, which all inherit these variables. A cached executable is the one
# a fresh compile produces, so no number changes (the sweep relies on the same fact).
# Every program is cached, however quick its compile: a fresh process (a CLI subprocess, a
# worker) otherwise recompiles the ~100 small eager programs a run's report and export
# need (measured: a tiny post-training run's second process, 37.6 s with a 0.5 s threshold,
# 28.4 s with none).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="mmjax-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# the subprocesses compile as this process does (below): quickly, with few optimizations
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests run tiny models: compile time dominates, so trade run-time speed for compile speed.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def cpu_devices():
  devices = jax.devices("cpu")
  assert len(devices) == 8, f"expected 8 fake CPU devices, got {len(devices)}"
  return devices


from data_fixtures import procedural_dir, tiny_dense_dir  # noqa: E402,F401  (shared)


# The longest tests (`--durations`, 2026-12-06: 60-135 s each, most of them subprocesses
# or whole runs) go first: pytest-xdist hands tests out in collection order, and with two
# workers a long test collected last leaves the other worker idle for most of its length.
LONGEST_FIRST = (
    "tests/test_train.py::test_sigkill_and_resume_is_bit_identical",
    "tests/test_train.py::test_two_processes_on_localhost_match_one_process",
    "tests/test_quickstart.py::test_quickstart_end_to_end_then_reuses_its_stages",
    "tests/test_compress_harness.py::test_ptq_fake_quant_and_integer_paths_agree",
    "tests/test_sweep.py::test_sweep_runs_resumes_and_reports",
    "tests/test_notebook.py::test_new_transform_notebook_runs",
    "tests/test_train.py::test_resume_after_the_final_checkpoint_and_past_an_unreadable_step",
    "tests/test_post_training_suite.py::test_suite_sensitivity_allocation_and_report",
    "tests/test_train.py::test_one_step_on_8_devices_equals_1_device",
)


def pytest_collection_modifyitems(items):
  rank = {nodeid: i for i, nodeid in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))  # stable: the rest keep order
