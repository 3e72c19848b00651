"""Tower throughput of mmjax's `small` model with token merging: the image and audio
towers alone (the fusion skipped by a hook, so the table isolates what ToMe speeds up),
dense against r tokens merged per block, side by side in one process.

  python bench/token_towers.py [--r 2,4,6] [--batch 64] [--reps 7] \
      [--out bench/results/token_towers_cpu.json]

Random weights (time only: merges keep fixed counts, so FLOPs and time do not depend on
the weights). Every variant is jitted once, then `--reps` interleaved rounds; medians.
The towers of `small`: image 16 tokens (7x7 patches of 28x28), audio 15 (full-band
patches of 4 frames), text 48 (not merged), two blocks each.
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

from mmjax.compress import Plan, flatten  # noqa: E402
from mmjax.compress.hooks import Around, apply as hooked  # noqa: E402
from mmjax.compress.token_merge import merge_tokens  # noqa: E402
from mmjax.harness.forward_cost import compiled_flops  # noqa: E402

TOWERS = "(?:image|audio)"


def towers_only(apply_fn):
  """The forward with the fusion skipped (its input tokens passed through) and the text
  tower skipped (zeros of its shape): what is left is the image and audio towers."""
  def skip_fusion(call):
    return call.args[0], {}

  def skip_text(call):
    tokens = call.args[0]
    x = jax.numpy.zeros(tokens.shape + (call.module.cfg.d_model,))
    return x, {"mask": tokens != 0}
  return hooked(apply_fn, [("fusion", Around(skip_fusion)), ("text", Around(skip_text))])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--r", default="2,4,6")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--out", default="bench/out/token_towers.json")
  a = p.parse_args(argv)
  from experiments.configs.common import base_config
  from mmjax.harness import family
  fam = family.from_config(base_config(tiny=False))
  batch = fam.example_batch(a.batch, seed=0, with_labels=False)
  params = jax.jit(fam.init)(jax.random.PRNGKey(0), batch)
  variants = {"dense": fam.apply}
  for r in (int(x) for x in a.r.split(",")):
    plan = Plan(merge_tokens(r, rf"{TOWERS}/block_\d+", tower=TOWERS))
    plan.check_hooks(fam.apply, params, {}, batch)
    variants[f"r={r}"] = plan.wrap(fam.apply, {}, list(flatten(params)))
  compiled, flops, tokens = {}, {}, {}
  for v, fn in variants.items():
    f = towers_only(fn)
    compiled[v], flops[v] = compiled_flops(lambda p, b, f=f: f(p, b)[0], params, batch)
    inter = jax.eval_shape(fn, params, batch)[1]
    tokens[v] = (inter["image"]["final"].shape[1], inter["audio"]["final"].shape[1])
    jax.block_until_ready(compiled[v](params, batch))
  times = {v: [] for v in variants}
  for _ in range(a.reps):
    for v in variants:
      t = time.perf_counter()
      jax.block_until_ready(compiled[v](params, batch))
      times[v].append(time.perf_counter() - t)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {a.batch}, {a.reps} reps: "
        "image and audio towers of `small`")
  print(f"{'':>6} {'median ms':>10} {'speedup':>8} {'MFLOPs/ex':>10} {'x dense':>8} "
        f"{'image tok':>9} {'audio tok':>9}")
  rows = []
  for v in variants:
    t = statistics.median(times[v])
    row = dict(variant=v, median_ms=1e3 * t,
               speedup=statistics.median(times["dense"]) / t,
               mflops_per_example=flops[v] / a.batch / 1e6,
               flops_ratio=flops[v] / flops["dense"], image_tokens=tokens[v][0],
               audio_tokens=tokens[v][1])
    rows.append(row)
    print(f"{v:>6} {row['median_ms']:10.2f} {row['speedup']:7.2f}x "
          f"{row['mflops_per_example']:10.2f} {row['flops_ratio']:8.3f} "
          f"{row['image_tokens']:9d} {row['audio_tokens']:9d}")
  results_file.write(a.out, dict(jax=jax.__version__, platform=jax.devices()[0].platform,
                                 batch=a.batch, reps=a.reps, rows=rows))


if __name__ == "__main__":
  main()
