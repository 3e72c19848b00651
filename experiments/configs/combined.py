"""The combined pipeline: self-distillation from the dense baseline, 90% gradual magnitude
pruning and int8 QAT together, fine-tuned from the dense checkpoint and exported (real
int8 codes and packed masks in <workdir>/export).

Arguments: `sparsity=<s>` (default 0.9), `bits=<b>` (default 8), `tiny`.
Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/combined.py --workdir=workdirs/combined
"""
from experiments.configs import prune_qat
from experiments.configs.common import distill, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, values={"sparsity": float, "bits": int})
  c = prune_qat.get_config(arg)
  c.compress.distill = distill(teacher="init", temperature=2.0, alpha=0.5, features=(),
                               feature_weight=0.0)
  return c
