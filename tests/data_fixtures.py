"""Shared, session-scoped prepared datasets for the data tests."""
import pytest

from mmjax.data import sources

SIZES = dict(num_train=6000, num_test=1000)


@pytest.fixture(scope="session")
def procedural_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sources.prepare("mm_arith/procedural", data_dir, log=lambda *_: None, **SIZES)
  return data_dir
