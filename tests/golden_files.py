"""Helpers of the golden-file tests (tests/golden, written by make_golden.py): the family
arguments a golden checkpoint's config.json gives (read as a user's checkpoint directory
is, through hf_config) and the relative error the equivalence tests bound."""
import os

import numpy as np

from mmjax.pretrained import hf_config

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def args(family: str, **over) -> dict:
  return {**hf_config.model_args(family, os.path.join(GOLDEN, family)), **over}


def rel(got, want) -> float:
  """max |got - want| / max |want|, in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)
