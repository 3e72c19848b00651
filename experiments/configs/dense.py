"""Dense multimodal baseline on mm_arith/procedural with the `small` model.

Reproduce (2026-11-30, 2-core CPU: 99.00% test accuracy after 3,000 steps at lr 5e-4, 830 s;
the earlier recipe, 6,000 steps at 1e-3, reached 99.05% in 36 min):
  ./launch.sh train --config=experiments/configs/dense.py --workdir=workdirs/dense
Test-sized (tiny model, 30 steps):
  ./launch.sh train --config=experiments/configs/dense.py:tiny --workdir=/tmp/dense_tiny
"""
from experiments.configs.common import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg)
  return base_config(tiny="tiny" in args)
