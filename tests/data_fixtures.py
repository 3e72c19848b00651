"""Shared, session-scoped fixtures: a prepared dataset, and a tiny dense run on it (the run
compression tests start from). Both are read-only to the tests, so the pytest-xdist workers
share one copy: the first worker to ask builds it under a file lock, the other waits and
reuses it (each worker building its own cost ~45 s of a worker's time)."""
import fcntl
import os
import shutil

import pytest

from mmjax.data import sources

SIZES = dict(num_train=6000, num_test=1000)


def _shared(tmp_path_factory, name, build):
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's directory, above every worker's own
  path = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / f"{name}.done").exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      build(str(path))
      (root / f"{name}.done").touch()
  return str(path)


@pytest.fixture(scope="session")
def procedural_dir(tmp_path_factory):
  return _shared(tmp_path_factory, "tfds",
                 lambda d: sources.prepare("mm_arith/procedural", d, log=lambda *_: None,
                                           **SIZES))


@pytest.fixture(scope="session")
def tiny_dense_dir(procedural_dir, tmp_path_factory):
  from experiments.configs import dense
  from mmjax.harness import train

  def build(workdir):
    c = dense.get_config("tiny")
    c.data.data_dir = procedural_dir
    c.mesh.data = 1
    train.train_and_evaluate(c, workdir, log=lambda *_: None)
  return _shared(tmp_path_factory, "dense", build)
