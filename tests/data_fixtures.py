"""Shared, session-scoped fixtures: a prepared dataset, and a tiny dense run on it (the run
compression tests start from)."""
import pytest

from mmjax.data import sources

SIZES = dict(num_train=6000, num_test=1000)


@pytest.fixture(scope="session")
def procedural_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sources.prepare("mm_arith/procedural", data_dir, log=lambda *_: None, **SIZES)
  return data_dir


@pytest.fixture(scope="session")
def tiny_dense_dir(procedural_dir, tmp_path_factory):
  from experiments.configs import dense
  from mmjax import train
  c = dense.get_config("tiny")
  c.data.data_dir = procedural_dir
  c.mesh.data = 1
  workdir = str(tmp_path_factory.mktemp("dense"))
  train.train_and_evaluate(c, workdir, log=lambda *_: None)
  return workdir
