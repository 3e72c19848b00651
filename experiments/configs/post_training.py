"""One-shot post-training compression of the dense run (train.steps=0): calibrate on
config.calibration.examples training examples, compress, evaluate, export. No fine-tuning,
unless `lora=`.

  method=   rtn | gptq | awq | sparsegpt | wanda | smoothquant      (default gptq), or
            magnitude: the pruning baseline (|w| per layer, one shot; sparsity= or nm=)
  bits=     2..8 integer weights (default 4); group=<g> groups of g inputs, group=0 per
            output channel (default 128)
  format=   int | nf4 | fp8_e4m3 | fp8_e5m2 weights
  sparsity= for sparsegpt / wanda (default 0.5); nm=2:4 for N:M instead
  joint     sparsegpt: round the kept weights to the grid in the same pass
  asym      integer grids with a zero point (2**bits levels; symmetric grids have
            2**bits - 1, so 2-bit symmetric is the three levels -1, 0, 1)
  w8a8      also quantize every compressed layer's input to int8 (per tensor, calibrated);
            with format=fp8_e4m3 the inputs go to fp8 e4m3 instead; with int8, the
            layers' products run as real int8 x int8 -> int32
  parallel  every statistic from the dense model (default: sequential, block by block)
  act_order GPTQ in order of decreasing Hessian diagonal
  balance=  none | modality | token: GPTQ's and AWQ's calibration tokens weighted by the
            task loss's sensitivity to them (modality: MBQ, each modality's mean; token:
            each its own)
  alloc=    a per-kernel allocation (experiments/sensitivity.py writes allocation_*.json):
            GPTQ with each kernel at the width it was given
  alpha=    SmoothQuant's migration strength (default 0.5); int8 runs its products as
            real int8 x int8 -> int32
  lora=<r>  then recover: LoRA adapters of rank r on the compressed kernels, trained for
            steps= (default 300) by distillation from the dense run (alpha 0.5 with the
            task loss), every model parameter frozen (the codes stay as calibrated)

Reproduce (after the dense run), e.g.:
  ./launch.sh train --config=experiments/configs/post_training.py:method=gptq,bits=3 \\
      --workdir=workdirs/pt_gptq_w3g128
  ./launch.sh train --config=experiments/configs/post_training.py:method=sparsegpt,nm=2:4,joint
  ./launch.sh train --config=experiments/configs/post_training.py:method=gptq,bits=2,group=32,lora=8
"""
import json
import os

from experiments.configs.common import (activations, distill, finetune_config, parse_arg,
                                        post_training, prune, section)
from mmjax.models.family import PRUNE_PATTERN


def _nm(text: str) -> tuple:
  n, sep, m = text.partition(":")
  if not sep or not (n.isdigit() and m.isdigit()):
    raise ValueError("must look like 2:4")
  return int(n), int(m)


def _allocation(path: str) -> list:
  if not os.path.exists(path):
    raise ValueError(f"config argument alloc={path}: no such file; write one with "
                     "python -m experiments.sensitivity --workdir=<dense run>.")
  with open(path) as f:
    rules = json.load(f).get("rules")
  if not rules:
    raise ValueError(f"alloc={path} holds no rules (not an allocation file).")
  return rules


WORDS = ("tiny", "joint", "w8a8", "parallel", "act_order", "int8", "asym")
VALUES = {"method": str, "bits": int, "group": int, "format": str, "sparsity": float,
          "balance": str,
          "nm": _nm, "alpha": float, "alloc": str, "lora": int, "steps": int}


def get_config(arg=None):
  args = parse_arg(arg, valid=WORDS, values=VALUES)
  c = finetune_config(args)
  c.train.steps = 0
  c = set_method(c, args, PRUNE_PATTERN, group=args.get("group", 32 if args.get("tiny") else 128))
  if "steps" in args and "lora" not in args:
    raise ValueError("config argument steps= is the LoRA recovery's length; give lora=<rank> "
                     "too (one-shot rows do not train).")
  if "lora" in args:
    c.train.steps = args.get("steps", 3 if args.get("tiny") else 300)
    c.compress.adapters = section("lora", rank=args["lora"], pattern=PRUNE_PATTERN)
    c.compress.distill = distill()
    c.optimizer.trainable = "none"  # the adapters alone: the base keeps its codes
  return c


def set_method(c, args: dict, pattern, group: int = 128):
  """config.compress for the one-shot method `args` name. `pattern`: the kernels it
  compresses (None: the model family's default, as for the pretrained families);
  `group`: the group size when `group=` is not given (tiny's kernels: 32, 64 inputs)."""
  group = args.get("group", group)
  n, m = args.get("nm", (0, 0))
  fmt = args.get("format", "int")
  if args.get("method") == "magnitude":  # the pruning baseline: |w|, per layer, one shot
    c.compress.prune = (prune("n_m", n=n, m=m, pattern=pattern) if m else
                        prune("magnitude", sparsity=args.get("sparsity", 0.5), pattern=pattern))
    return c
  method = args.get("method", "gptq")
  kw = {}
  if method in ("gptq", "awq", "sparsegpt", "wanda"):  # calibrated block by block, or not
    kw["mode"] = "parallel" if args.get("parallel") else "sequential"
  if method in ("rtn", "gptq", "awq", "sparsegpt"):  # the number grid
    # small's MLP is 352 wide (2.75 x 128): its fc2 kernels get a last group of 96
    kw.update(format=fmt, bits=args.get("bits", 4), symmetric=not args.get("asym"),
              granularity="group" if group else "channel", group_size=group or 128,
              ragged_groups=True)
  if method == "gptq":
    kw["act_order"] = bool(args.get("act_order"))
  if "balance" in args:
    if method not in ("gptq", "awq"):
      raise ValueError(f"config argument balance= weighs GPTQ's and AWQ's calibration tokens; "
                       f"method={method} has no such setting (use method=gptq or awq).")
    kw["balance"] = args["balance"]
  if method in ("sparsegpt", "wanda"):
    kw.update(sparsity=args.get("sparsity", 0.5), n=n, m=m)
  if method == "sparsegpt":
    kw["joint_quant"] = bool(args.get("joint"))
  if method == "smoothquant":
    kw.update(alpha=args.get("alpha", 0.5), act_mode="int8" if args.get("int8") else "fake")
  c.compress.post_training = post_training(method, pattern=pattern, **kw)
  if args.get("alloc"):
    c.compress.post_training.rules = tuple(tuple(r) for r in _allocation(args["alloc"]))
  if args.get("w8a8"):  # with int8: the products run as real int8 x int8 -> int32
    kw = dict(mode="int8") if args.get("int8") and not fmt.startswith("fp8") else {}
    c.compress.activations = activations(
        pattern=pattern, format=fmt if fmt.startswith("fp8") else "int", **kw)
  return c
