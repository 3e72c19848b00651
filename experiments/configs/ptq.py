"""Post-training quantization of the dense baseline, without training (train.steps=0):
int8 per-channel weights, and every Dense layer's input quantized to int8 with ranges
calibrated on 8 training batches. `int8` evaluates through the real integer path
(int8 x int8 -> int32 matmuls) instead of fake-quant; `percentile=<p>` clips ranges at the
p-th percentile of |x| instead of the max.

Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/ptq.py --workdir=workdirs/ptq_int8
"""
from experiments.configs.common import activations, finetune_config, parse_arg, quant


def get_config(arg=None):
  args = parse_arg(arg, valid=("tiny", "int8"), values={"percentile": float})
  c = finetune_config(args)
  c.train.steps = 0
  c.compress.quant = quant()
  c.compress.activations = activations(mode="int8" if args.get("int8") else "fake",
                                       percentile=args.get("percentile"))
  c.calibration.examples = 8 * c.data.batch_size  # 8 batches, as published
  return c
