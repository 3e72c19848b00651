"""GPTQ and SparseGPT on every linear layer of pretrained-size encoders: wall time and
peak memory of the whole calibration (statistics and solves), 128 calibration examples.

  python bench/pretrained_calibration.py --model vit_b16 [--method gptq] [--mode sequential]
      [--out bench/results/pretrained_calibration_<model>_<method>.json]

Models: `vit_b16` (ViT-B/16 at 224: 72 block kernels and the conv stem), `siglip_b16`
(SigLIP B/16 at 224, both towers: 144 block kernels, the pooling head's 6, the text
head, the stem), `whisper_base` (the encoder over 30 s of log-mel: 36 kernels, 2 convs).
Random weights and inputs (timing does not depend on the values; the issue's targets are
times): GPTQ 4-bit in groups of 128, SparseGPT 50%, in mmjax's default sequential mode
(each block from the already-compressed earlier ones). Run one model and method per
process: peak RSS is the process's (`ru_maxrss`).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import results_file  # noqa: E402

import jax  # noqa: E402

MODELS = {"vit_b16": ("mmjax.pretrained.vit", dict(variant="B/16")),
          "siglip_b16": ("mmjax.pretrained.siglip", dict(variant="B/16")),
          "whisper_base": ("mmjax.pretrained.whisper", dict(variant="base"))}
STEMS = {"vit_b16": r"stem/kernel", "siglip_b16": r"image_stem/kernel",
         "whisper_base": r"conv\d/kernel"}


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", choices=sorted(MODELS), required=True)
  ap.add_argument("--method", choices=("gptq", "sparsegpt"), default="gptq")
  ap.add_argument("--mode", choices=("sequential", "parallel"), default="sequential")
  ap.add_argument("--examples", type=int, default=128)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  log = lambda m: print(m, flush=True)

  import importlib
  from mmjax.compress import Plan, flatten, formats, rules
  from mmjax.compress.post_training import gptq, sparsegpt
  module, model_args = MODELS[args.model]
  fam = importlib.import_module(module).family(model_args)
  t0 = time.perf_counter()
  params = jax.jit(fam.init)(jax.random.PRNGKey(0), fam.example_batch(1))
  jax.block_until_ready(params)
  pattern = rf"{fam.patterns['matmul']}|{STEMS[args.model]}"
  kernels = [p for p in flatten(params) if re.fullmatch(pattern, p)]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(f"{args.model}: {n_params:,} parameters, {len(kernels)} kernels calibrated, "
      f"init {time.perf_counter() - t0:.0f} s")
  batches = [fam.example_batch(args.batch, seed=s, with_labels=False)
             for s in range(args.examples // args.batch)]
  g4 = formats.grid("int", 4, granularity="group", group_size=128, ragged=True)
  method = (gptq.method(g4, mode=args.mode) if args.method == "gptq"
            else sparsegpt.method(0.5, mode=args.mode))
  plan = Plan(rules([(pattern, method)]))
  t0 = time.perf_counter()
  p, cs = plan.start(params, jax.random.PRNGKey(0))
  p, cs = plan.calibrate(fam.apply, p, cs, batches)
  jax.block_until_ready((p, cs))
  seconds = time.perf_counter() - t0
  result = dict(model=args.model, method=args.method, mode=args.mode, kernels=len(kernels),
                parameters=int(n_params), examples=args.examples, seconds=seconds,
                peak_rss_gib=peak_rss_gib(), devices=jax.device_count(),
                backend=jax.default_backend())
  log(f"| {args.model} | {args.method} ({args.mode}) | {len(kernels)} | {args.examples} | "
      f"{seconds:.0f} s | {peak_rss_gib():.2f} GiB |")
  results_file.write(args.out or os.path.join(
      "bench", "results", f"pretrained_calibration_{args.model}_{args.method}.json"), result,
      log)


if __name__ == "__main__":
  main()
