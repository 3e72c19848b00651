"""Train-step benchmark: speed of the jitted step and the time spent outside it.

  python bench/train_step.py --data_dir=DIR --out bench/out/train_step.json

Runs the real harness (`mmjax.train.train_and_evaluate`) on the `small` dense config for
`--steps` steps (input pipeline, logging every 50 steps, a checkpoint every 100 and at the
end, one evaluation at the end), then, in the same process, times the compiled train step
alone on one fixed batch. Reports compile time, steps/s and examples/s of the loop and of
the bare step, and the fraction of the loop spent outside the jitted step (input, logging,
checkpointing): 1 - steps * median bare step time / loop time. Target: < 10%.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default="/tmp/mmjax_bench_tfds")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--out", default="bench/out/train_step.json")
  args = p.parse_args(argv)

  import jax

  from experiments.configs import dense
  from mmjax import optim, sharding, train
  from mmjax.data.pipeline import train_iterator
  from mmjax.models import MultimodalModel, random_inputs

  cfg = dense.get_config()
  cfg.data.data_dir = args.data_dir
  cfg.data.batch_size = args.batch_size
  cfg.mesh.data = 1
  cfg.train.update(steps=args.steps, log_every=50, checkpoint_every=100,
                   eval_every=10 * args.steps)
  with tempfile.TemporaryDirectory() as workdir:
    summary = train.train_and_evaluate(cfg, workdir, log=lambda *_: None)

  setup = train.validate(cfg)
  model = MultimodalModel(setup.model_cfg)
  tx, schedule = optim.make_optimizer(cfg.optimizer, args.steps)
  init_fn = train.make_init_fn(model, tx, random_inputs(setup.model_cfg, 1), 0)
  state = jax.jit(init_fn)()
  local = next(train_iterator(setup.input_cfg))
  keys = [k for k in local if k in set(setup.model_cfg.modalities) or k.endswith("_mask")
          or k == "label"]
  batch = sharding.global_batch({k: local[k] for k in keys},
                                sharding.batch_sharding(setup.mesh))
  step = jax.jit(train.make_train_step(model, tx, schedule, setup.model_cfg),
                 donate_argnums=(0,))
  state, m = step(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(30):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  bare = statistics.median(times)
  loop = summary["loop_s"]
  outside = 1.0 - summary["steps_run"] * bare / loop
  res = dict(steps=summary["steps_run"], batch_size=args.batch_size,
             compile_s=summary["compile_s"], loop_s=loop,
             loop_steps_per_s=summary["steps_run"] / loop,
             loop_examples_per_s=summary["steps_run"] * args.batch_size / loop,
             bare_step_s=bare, bare_examples_per_s=args.batch_size / bare,
             outside_fraction=outside, backend=jax.default_backend(), cpus=os.cpu_count())
  print(f"small dense model, batch {args.batch_size}, {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs")
  print(f"  compile                     {res['compile_s']:.1f} s")
  print(f"  loop ({res['steps']} steps)           {loop:.1f} s: "
        f"{res['loop_steps_per_s']:.2f} steps/s, {res['loop_examples_per_s']:.0f} examples/s")
  print(f"  bare step (median of 30)    {bare * 1e3:.1f} ms: "
        f"{res['bare_examples_per_s']:.0f} examples/s")
  print(f"  time outside the step       {outside * 100:.1f}% (target < 10%)")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
