"""N:M semi-structured pruning (2:4 by default) of the dense baseline, then fine-tuning.

Arguments: `n=<N>`, `m=<M>`, `tiny`. Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/nm.py --workdir=workdirs/nm_2_4
"""
from experiments.configs.common import finetune_config, parse_arg, prune


def get_config(arg=None):
  args = parse_arg(arg, values={"n": int, "m": int})
  c = finetune_config(args)
  c.compress.prune = prune(method="n_m", n=args.get("n", 2), m=args.get("m", 4),
                           ramp=dict(begin=0))
  return c
