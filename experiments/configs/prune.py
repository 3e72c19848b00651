"""Magnitude pruning of the dense baseline, fine-tuned from its checkpoint.

Arguments (comma-separated): `sparsity=<s>` (default 0.9), `oneshot` (prune once at the
start instead of the gradual cubic ramp), `random` (random scores: the baseline),
`global` (one threshold over all pruned kernels instead of one per layer), `tiny`.

Reproduce (after the dense run: ./launch.sh train --config=experiments/configs/dense.py
--workdir=workdirs/dense):
  ./launch.sh train --config=experiments/configs/prune.py:sparsity=0.9 --workdir=workdirs/prune90
  ./launch.sh train --config=experiments/configs/prune.py:sparsity=0.9,oneshot \
      --workdir=workdirs/prune90_oneshot
Per-tower budgets: --config.compress.prune.rules="(('image/.*/kernel', 0.9), ('text/.*/kernel', 0.5))"
is one override away (regexes over parameter paths; the first matching rule wins).
"""
from experiments.configs.common import finetune_config, parse_arg, prune


def get_config(arg=None):
  args = parse_arg(arg, valid=("tiny", "oneshot", "random", "global"),
                   values={"sparsity": float})
  c = finetune_config(args)
  steps = c.train.steps
  ramp = (dict(kind="one_shot", begin=0) if args.get("oneshot") else
          dict(kind="polynomial", begin=0, end=int(steps * 0.75),
               every=max(1, steps // 40), power=3.0))
  c.compress.prune = prune(method="random" if args.get("random") else "magnitude",
                           scope="global" if args.get("global") else "layer",
                           sparsity=args.get("sparsity", 0.9), ramp=ramp)
  return c
