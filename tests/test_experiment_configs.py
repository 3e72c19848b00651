"""Experiment configs build and pass the harness's validation (no training here: each
method's end-to-end run is in test_compress_harness / test_train)."""
import os
import subprocess
import sys

import pytest

from experiments.configs import modalities
from mmjax.harness import train
from mmjax.models.family import model_config


@pytest.mark.parametrize("use", ["text", "image", "audio", "image+audio", "text+image",
                                 "text+audio"])
def test_modality_subsets_build_a_model_of_just_those_towers(use):
  config = modalities.get_config(f"use={use},tiny")
  config.data.data_dir = "/nonexistent"  # validation does not read data
  setup = train.validate(config)
  assert sorted(model_config(setup.family).modalities) == sorted(use.split("+"))
  assert sorted(setup.family.modalities) == sorted(use.split("+"))
  assert sorted(setup.input_cfg.modalities) == sorted(use.split("+"))


@pytest.mark.parametrize("arg, needle", [
    ("tiny", "needs use="),
    ("use=image+video", "not a proper subset"),
    ("use=text+image+audio", "not a proper subset"),
    ("use=image+image", "not a proper subset"),
])
def test_bad_modality_subsets(arg, needle):
  with pytest.raises(ValueError, match=needle):
    modalities.get_config(arg)


def test_missing_config_file_is_one_line_listing_the_configs():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-m", "experiments.main",
                      "--config=experiments/configs/nope.py", "--workdir=/tmp/unused"],
                     cwd=repo, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "nope.py" in r.stderr and "dense.py" in r.stderr, r.stderr
  assert "common.py" not in r.stderr and "__init__" not in r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
