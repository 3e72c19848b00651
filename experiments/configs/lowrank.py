"""Low-rank factorization of the dense baseline, fine-tuned: every attention and MLP
kernel W [K, N] becomes A [K, r] @ B [r, N] from its truncated SVD, and the factors train
with the model (mmjax/compress/lowrank.py).

Arguments: `rank=<r>` (default 16; the tiny model's kernels are 32-64 wide: use 8),
`tiny`. Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/lowrank.py:rank=16 --workdir=workdirs/lowrank16
"""
from experiments.configs.common import finetune_config, parse_arg, section
from mmjax.models.family import PRUNE_PATTERN


def get_config(arg=None):
  args = parse_arg(arg, valid=("tiny",), values={"rank": int})
  c = finetune_config(args, steps=500)
  c.compress.factorize = section("lowrank", rank=args.get("rank", 8 if args.get("tiny")
                                                           else 16), pattern=PRUNE_PATTERN)
  return c
