"""Quantization-aware fine-tuning of the dense baseline: symmetric fake-quant weights with
a straight-through estimator, per output channel.

Arguments: `bits=<2..8>` (default 8), `tensor` (per-tensor scales), `int8` (also quantize
every Dense input, calibrated, and run every Dense layer's forward and backward matmuls as
real int8 x int8 -> int32 products with straight-through gradients), `float_grads` (with
`int8`: float backward matmuls), `lsq` (learned step sizes, LSQ, instead of min-max
scales), `tiny`.
Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/qat.py --workdir=workdirs/qat_int8
"""
from experiments.configs.common import (QUANT_PATTERN, activations, finetune_config,
                                        parse_arg, quant, section)


def get_config(arg=None):
  args = parse_arg(arg, valid=("tiny", "tensor", "int8", "float_grads", "lsq"),
                   values={"bits": int})
  c = finetune_config(args, steps=500)
  kw = dict(bits=args.get("bits", 8), granularity="tensor" if args.get("tensor") else "channel")
  c.compress.quant = (section("lsq", pattern=QUANT_PATTERN, **kw) if args.get("lsq")
                      else quant(**kw))
  if args.get("int8"):
    c.compress.activations = activations(mode="int8", int8_grads=not args.get("float_grads"))
  return c
