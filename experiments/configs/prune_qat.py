"""Gradual magnitude pruning and int8 QAT together (masks first, then fake-quant of what
remains), fine-tuned from the dense baseline.

Arguments: `sparsity=<s>` (default 0.9), `bits=<b>` (default 8), `tiny`.
Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/prune_qat.py --workdir=workdirs/prune90_int8
"""
from experiments.configs import prune, qat
from experiments.configs.common import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, values={"sparsity": float, "bits": int})
  tiny = "tiny" if args.get("tiny") else ""
  c = prune.get_config(",".join(x for x in (tiny, f"sparsity={args.get('sparsity', 0.9)}")
                                if x))
  c.compress.quant = qat.get_config(",".join(
      x for x in (tiny, f"bits={args.get('bits', 8)}") if x)).compress.quant
  return c
