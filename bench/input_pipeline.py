"""Input pipeline throughput next to the train step it feeds.

  python bench/input_pipeline.py --data_dir=DIR --out bench/out/input_pipeline.json

Prepares mm_arith/procedural in DIR if needed (timing that too), then measures in one
process: (1) examples/s of the grain pipeline over one full training epoch; (2) the median
train-step time of the `small` dense model (AdamW, all three modalities) at the same batch
size. The pipeline is not the bottleneck when its time per batch is well below the step's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default="/tmp/mmjax_bench_tfds")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--num_threads", type=int, default=2)
  p.add_argument("--steps", type=int, default=30, help="train steps timed")
  p.add_argument("--out", default="bench/out/input_pipeline.json")
  args = p.parse_args(argv)

  import jax
  import optax

  from mmjax.data import sources
  from mmjax.data.pipeline import InputConfig, train_iterator
  from mmjax.models import MultimodalModel, get_preset

  t0 = time.perf_counter()
  builder = sources.prepare("mm_arith/procedural", args.data_dir, log=lambda *_: None)
  prepare_s = time.perf_counter() - t0
  n_train = builder.info.splits["train"].num_examples

  cfg = InputConfig(data_dir=args.data_dir, batch_size=args.batch_size,
                    num_threads=args.num_threads)
  it = train_iterator(cfg)
  first = next(it)  # warm-up: opens files, starts threads
  steps_per_epoch = n_train // args.batch_size
  t0 = time.perf_counter()
  for _ in range(steps_per_epoch):
    next(it)
  epoch_s = time.perf_counter() - t0
  pipe_ex_s = steps_per_epoch * args.batch_size / epoch_s

  model_cfg = get_preset("small")
  model = MultimodalModel(model_cfg)
  params = jax.jit(model.init)(jax.random.key(0), first)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)

  def step(p, o, batch):
    def loss_fn(p):
      logits, _ = model.apply(p, batch)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  batch = {k: v for k, v in first.items()}
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  params, opt_state, loss = compiled(params, opt_state, batch)
  jax.block_until_ready(loss)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, batch)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  batch_s = args.batch_size / pipe_ex_s

  rows = [("dataset prepare (20k+2k examples, if needed)", f"{prepare_s:.1f} s"),
          ("pipeline, one epoch", f"{epoch_s:.1f} s for {steps_per_epoch} batches"),
          ("pipeline throughput", f"{pipe_ex_s:,.0f} examples/s"),
          ("pipeline time per batch", f"{batch_s * 1e3:.1f} ms"),
          ("small model train step (median)", f"{step_s * 1e3:.1f} ms "
           f"({args.batch_size / step_s:,.0f} examples/s)"),
          ("pipeline / step time", f"{batch_s / step_s:.3f}")]
  print(f"batch size {args.batch_size}, {args.num_threads} read threads, backend "
        f"{jax.default_backend()}, {os.cpu_count()} CPUs")
  for k, v in rows:
    print(f"  {k:<46} {v}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(batch_size=args.batch_size, num_threads=args.num_threads,
                   prepare_s=prepare_s, epoch_s=epoch_s, pipeline_examples_per_s=pipe_ex_s,
                   step_s=step_s, model_examples_per_s=args.batch_size / step_s,
                   pipeline_over_step=batch_s / step_s), f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
