"""Train-step benchmark: speed of the jitted step and the time spent outside it.

  python bench/train_step.py --data_dir=DIR --out bench/out/train_step.json

Runs the real harness (`mmjax.harness.train.train_and_evaluate`) on the `small` dense config for
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

from bench import results_file  # noqa: E402


def vs_torch(batch_size: int, reps: int, out: str):
  """The `small` model's train step in JAX (jitted) and in PyTorch (eager), interleaved."""
  import jax
  import numpy as np
  import optax
  import torch

  from bench.torch_twin import TorchMultimodal, load_flax_params, to_torch
  from mmjax.models import MultimodalModel, get_preset, random_inputs

  cfg = get_preset("small")
  batch = random_inputs(cfg, batch_size, seed=0)
  model = MultimodalModel(cfg)
  params = jax.jit(model.init)(jax.random.key(0), batch)
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  opt = tx.init(params)

  def jax_step(p, o, b):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b)[0],
                                                             b["label"]).mean()
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  jstep = jax.jit(jax_step, donate_argnums=(0, 1))
  torch.manual_seed(0)
  tmodel = TorchMultimodal(cfg)
  tbatch = to_torch(batch)
  n_jax = sum(x.size for x in jax.tree.leaves(params))
  n_torch = sum(p.numel() for p in tmodel.parameters())
  if n_jax != n_torch:
    raise AssertionError(f"twin parameter counts differ: jax {n_jax:,}, torch {n_torch:,}")

  # Same architecture, same numbers: with the Flax weights copied in, the logits agree.
  load_flax_params(tmodel, params)
  with torch.no_grad():
    diff = np.abs(tmodel(tbatch).numpy() - np.asarray(model.apply(params, batch)[0])).max()
  if diff > 1e-3:
    raise AssertionError(f"the PyTorch twin computes something else: max logit diff {diff}")
  torch.manual_seed(0)
  tmodel = TorchMultimodal(cfg)  # fresh init for the timing, as in a real run
  topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-3, weight_decay=1e-4)

  def torch_step():
    topt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(tmodel(tbatch), tbatch["label"])
    loss.backward()
    topt.step()
    return loss.item()

  params, opt, loss = jstep(params, opt, batch)
  jax.block_until_ready(loss)
  torch_step()
  jt, tt = [], []
  for _ in range(reps):
    t0 = time.perf_counter()
    params, opt, loss = jstep(params, opt, batch)
    jax.block_until_ready(loss)
    jt.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    torch_step()
    tt.append(time.perf_counter() - t0)
  j, t = statistics.median(jt), statistics.median(tt)
  res = dict(batch_size=batch_size, params=n_jax, max_logit_diff=float(diff), jax_step_s=j,
             torch_eager_step_s=t,
             jax_over_torch=j / t, torch=torch.__version__, torch_threads=torch.get_num_threads(),
             jax=jax.__version__)
  print(f"small model ({n_jax:,} parameters in both; same logits to {diff:.1e}), batch "
        f"{batch_size}, interleaved x{reps}")
  print(f"  JAX jitted step     {j * 1e3:8.1f} ms")
  print(f"  PyTorch eager step  {t * 1e3:8.1f} ms ({torch.get_num_threads()} threads)")
  print(f"  JAX / PyTorch       {j / t:8.2f}  (target <= 1.0)")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {out}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vs_torch", action="store_true",
                 help="only compare the step with a PyTorch twin (needs `pip install "
                 "-e .[bench]`)")
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--data_dir", default="/tmp/mmjax_bench_tfds")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--out", default="bench/out/train_step.json")
  args = p.parse_args(argv)
  if args.vs_torch:
    out = args.out if args.out != "bench/out/train_step.json" else "bench/out/vs_torch.json"
    return vs_torch(args.batch_size, args.reps, out)

  import jax

  from experiments.configs import dense
  from mmjax.data.pipeline import train_iterator
  from mmjax.harness import optim, sharding, train

  cfg = dense.get_config()
  cfg.data.data_dir = args.data_dir
  cfg.data.batch_size = args.batch_size
  cfg.mesh.data = 1
  cfg.train.update(steps=args.steps, log_every=50, checkpoint_every=100,
                   eval_every=10 * args.steps)
  with tempfile.TemporaryDirectory() as workdir:
    summary = train.train_and_evaluate(cfg, workdir, log=lambda *_: None)

  setup = train.validate(cfg)
  fam = setup.family
  tx, lr_schedule = optim.make_optimizer(cfg.optimizer, args.steps)
  steps = train.make_steps(fam, setup.task, tx, lr_schedule, setup.compression.plan)
  sample = fam.example_batch(1)
  rng = jax.random.PRNGKey(0)
  params = jax.jit(fam.init)(jax.random.fold_in(rng, 1), sample)
  state = jax.jit(steps.init)(params, rng, sample)
  local = next(train_iterator(setup.input_cfg))
  batch = sharding.global_batch(train.model_inputs(local, fam, setup.task),
                                sharding.batch_sharding(setup.mesh))
  step = jax.jit(steps.train_step, donate_argnums=(0,))  # as the harness does
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
  results_file.write(args.out, res)


if __name__ == "__main__":
  main()
