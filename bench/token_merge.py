"""Token merging (ToMe) throughput on ViT-B/16 and SigLIP B/16 (the image tower), random
weights (time only): dense against r = 8 and r = 16 tokens merged per block, side by side
in one process.

  python bench/token_merge.py [--models vit_b16,siglip_b16] [--r 8,16] [--batch 16] \
      [--reps 5] [--out bench/results/token_merge_cpu.json]

Every variant is jitted once; then `--reps` rounds, each timing every variant once in turn
(interleaved, so drift hits them alike). Printed: the median wall time of a forward over
`--batch` images of 224 px, images/s, the speed-up over dense, XLA's FLOP count (cost
analysis) and its ratio to dense, and the tokens left after the last block. ViT keeps its
class token (keep_first=1); as in ToMe, a block merges at most half its tokens, so r = 16
leaves ViT-B/16 with 11 tokens of 197 after 12 blocks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import results_file  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mmjax.compress import Plan, flatten  # noqa: E402
from mmjax.compress.token_merge import merge_tokens  # noqa: E402
from mmjax.harness.forward_cost import compiled_flops  # noqa: E402


def _vit():
  from mmjax.pretrained import vit
  return vit.family(dict(variant="B/16")), dict(blocks=r"block_\d+", keep_first=1), \
      lambda out: out[0]


def _siglip():
  from mmjax.pretrained import siglip
  return siglip.family(dict(variant="B/16")), dict(blocks=r"image/block_\d+"), \
      lambda out: out[0]["image"]


MODELS = {"vit_b16": _vit, "siglip_b16": _siglip}


def bench(name, rs, batch_size, reps, log):
  fam, where, output = MODELS[name]()
  images = np.random.default_rng(0).normal(size=(batch_size, 224, 224, 3)).astype(np.float32)
  batch = {"image": images}
  params = jax.jit(fam.init)(jax.random.PRNGKey(0), batch)
  variants = {"dense": fam.apply}
  for r in rs:
    plan = Plan(merge_tokens(r, **where))
    plan.check_hooks(fam.apply, params, {}, batch)
    variants[f"r={r}"] = plan.wrap(fam.apply, {}, list(flatten(params)))
  compiled, flops, tokens = {}, {}, {}
  for v, fn in variants.items():
    compiled[v], flops[v] = compiled_flops(lambda p, b, fn=fn: output(fn(p, b)), params,
                                           batch)
    inter = jax.eval_shape(fn, params, batch)[1]
    last = max(k for k in inter if k.rsplit("/", 1)[-1].startswith("block_"))
    tokens[v] = inter[last].shape[1]
    jax.block_until_ready(compiled[v](params, batch))  # warm
  times = {v: [] for v in variants}
  for _ in range(reps):
    for v in variants:
      t = time.perf_counter()
      jax.block_until_ready(compiled[v](params, batch))
      times[v].append(time.perf_counter() - t)
  rows = []
  dense_t, dense_f = statistics.median(times["dense"]), flops["dense"]
  for v in variants:
    t = statistics.median(times[v])
    rows.append(dict(model=name, variant=v, median_ms=1e3 * t, images_per_s=batch_size / t,
                     speedup=dense_t / t, gflops=flops[v] / 1e9, flops_ratio=flops[v] / dense_f,
                     tokens_after_last_block=tokens[v]))
    r = rows[-1]
    log(f"{name:>11} {v:>6} {r['median_ms']:10.1f} {r['images_per_s']:9.1f} "
        f"{r['speedup']:7.2f}x {r['gflops']:9.1f} {r['flops_ratio']:7.3f} "
        f"{r['tokens_after_last_block']:7d}")
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="vit_b16,siglip_b16")
  p.add_argument("--r", default="8,16")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--out", default="bench/out/token_merge.json")
  a = p.parse_args(argv)
  models = a.models.split(",")
  bad = [m for m in models if m not in MODELS]
  if bad:
    p.error(f"--models: unknown {bad}; valid: {', '.join(MODELS)}")
  rs = [int(x) for x in a.r.split(",")]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {a.batch}, {a.reps} reps")
  print(f"{'model':>11} {'':>6} {'median ms':>10} {'images/s':>9} {'speedup':>8} "
        f"{'GFLOPs':>9} {'x dense':>7} {'tokens':>7}")
  rows = [row for m in models for row in bench(m, rs, a.batch, a.reps, print)]
  results_file.write(a.out, dict(jax=jax.__version__, platform=jax.devices()[0].platform,
                                 batch=a.batch, reps=a.reps, rows=rows))


if __name__ == "__main__":
  main()
