"""Structured pruning of the dense baseline: whole attention heads (`heads`, default) or MLP
hidden units (`mlp`), gradually, then fine-tuning; the run's export includes a physically
smaller model (fewer heads / a narrower MLP) in <workdir>/shrunk.

Arguments: `sparsity=<s>` (default 0.5: 2 of 4 heads), `mlp`, `tiny`.
Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/structured.py --workdir=workdirs/heads50
  ./launch.sh train --config=experiments/configs/structured.py:mlp,sparsity=0.75 \
      --workdir=workdirs/mlp75
"""
from experiments.configs.common import finetune_config, parse_arg, prune


def get_config(arg=None):
  args = parse_arg(arg, valid=("tiny", "mlp"), values={"sparsity": float})
  c = finetune_config(args)
  steps = c.train.steps
  c.compress.prune = prune(method="mlp_units" if args.get("mlp") else "heads",
                           sparsity=args.get("sparsity", 0.5),
                           pattern="",  # empty: the method's own (every head / MLP)
                           ramp=dict(kind="polynomial", begin=0, end=int(steps * 0.5),
                                     every=max(1, steps // 20), power=3.0))
  return c
