"""What one forward costs, compressed and dense, side by side in one process: XLA's FLOP
count (the compiled program's cost analysis) and the median wall time over a batch of
the family's example inputs. Token methods change the FLOPs (fewer tokens); weight
methods, in mmjax's research forward, barely do: the weights' view is computed once,
outside the measured program (a deployed model computes with stored weights), and what
is left is an activation stage's work (fake-quant of inputs).

Opt-in (`config.train.measure_forward=<batch>`; the sweep sets 64), as it compiles two
more programs at the end of a run."""
from __future__ import annotations

import statistics
import time

import jax

from mmjax.compress import flatten


def compiled_flops(fn, *args):
  """-> (fn compiled for args, the FLOPs XLA's cost analysis counts in it)."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return compiled, float(cost.get("flops", 0.0)) if cost else 0.0


def measure(fam, plan, params, cstate, batch_size: int, reps: int = 5) -> dict:
  """{forward_flops, dense_forward_flops, forward_ms, dense_forward_ms, batch} for one
  forward of `batch_size` examples (FLOPs per example; ms for the batch, median)."""
  batch = fam.example_batch(batch_size, seed=0, with_labels=False)
  dense_fn = lambda p, b: fam.apply(p, b)[0]
  # the weights' view (fake-quant, factor products) once, outside: a deployed model
  # computes with stored weights, not with the view's arithmetic at every forward
  view = jax.jit(plan.view)(params, cstate)
  compressed_fn = lambda v, c, b: plan.wrap(fam.apply, c, flatten(params))(v, b)[0]
  dense, dense_flops = compiled_flops(dense_fn, params, batch)
  comp, flops = compiled_flops(compressed_fn, view, cstate, batch)
  runs = {"dense": (dense, (params, batch)), "compressed": (comp, (view, cstate, batch))}
  times = {k: [] for k in runs}
  for k, (fn, args) in runs.items():  # warm
    jax.block_until_ready(fn(*args))
  for _ in range(reps):  # interleaved, so drift hits both alike
    for k, (fn, args) in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[k].append(time.perf_counter() - t)
  return dict(batch=batch_size, forward_flops=flops / batch_size,
              dense_forward_flops=dense_flops / batch_size,
              forward_ms=1e3 * statistics.median(times["compressed"]),
              dense_forward_ms=1e3 * statistics.median(times["dense"]))


def measure_config(config, batch_size: int) -> dict:
  """`measure` for a run's config alone, on freshly initialized weights: FLOPs and wall
  time do not depend on the weights' values (token methods keep fixed counts), so a run
  finished before it measured its cost gets the same figures."""
  from mmjax.harness.run_setup import validate
  setup = validate(config)
  fam, plan = setup.family, setup.compression.plan
  sample = fam.example_batch(1, seed=0)
  params = jax.jit(fam.init)(jax.random.PRNGKey(0), sample)
  params, cstate = plan.start(params, jax.random.PRNGKey(1))
  return measure(fam, plan, params, cstate, batch_size)
