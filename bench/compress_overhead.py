"""What compression costs per train step, and what it saves on disk.

  python bench/compress_overhead.py [--init workdirs/dense] [--reps 15] \
      [--out bench/out/compress_overhead.json]

Builds the real harness train step (`mmjax.train.make_train_step`, jitted with the state
donated, as the harness does) of the `small` model for
each method and times them interleaved in one process (method order rotated every
round), median over `--reps` rounds, each divided by the dense step's median:

  masks (apply)      gradual magnitude pruning on a step that only applies its masks
  masks (recompute)  the step that recomputes every mask (exact top-k by bisection)
  2:4                N:M masks
  int8 QAT           per-channel weight fake-quant, straight-through
  prune+int8         both
  int8 matmuls       weights and every Dense input in int8, int8 x int8 -> int32 forward,
                     straight-through backward
  distill            the half-size student's step with the dense teacher's forward inside,
                     against the student's own step and the prediction
                     1 + teacher forward FLOPs / student step FLOPs (XLA cost analysis)

Then exports (the same writer as every run) the dense fp32 weights and the int8,
2:4 + int8 and 90% + int8 versions and reports bytes on disk and their ratios. With
`--init`, the weights are that trained run's; otherwise a fresh initialisation (said so).
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

import jax  # noqa: E402
import numpy as np  # noqa: E402


def _batch(cfg, batch_size):
  from mmjax.models import random_inputs
  b = random_inputs(cfg, batch_size, seed=0)
  b["label"] = np.random.default_rng(0).integers(0, 10, batch_size).astype(np.int32)
  b["example_mask"] = np.ones(batch_size, bool)
  return {k: jax.numpy.asarray(v) for k, v in b.items()}


def _plan(cfg_compress, model_cfg):
  from mmjax.compress import build_plan
  from mmjax.compress.configure import param_shapes
  return build_plan(cfg_compress, param_shapes(model_cfg), model_cfg.num_heads)


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--init", default=None, help="a trained dense run's workdir")
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--out", default="bench/out/compress_overhead.json")
  args = ap.parse_args()

  import optax

  from mmjax import checkpointing, train
  from mmjax.compress import export
  from mmjax.compress.configure import PRUNE_PATTERN, QUANT_PATTERN
  from mmjax.compress.distill import Distill
  from mmjax.models import MultimodalModel, get_preset

  cfg = get_preset("small")
  model = MultimodalModel(cfg)
  batch = _batch(cfg, args.batch_size)
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  schedule = lambda s: 1e-3
  params0 = jax.jit(model.init)(jax.random.key(0), batch)["params"]
  source = "fresh initialisation"
  if args.init:
    reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(args.init), read_only=True)
    params0 = jax.device_get(reader.restore_local(reader.latest_step())["params"])
    reader.close()
    source = f"trained weights from {args.init}"

  never = dict(kind="polynomial", begin=10**8, end=10**8 + 1, every=1)
  always = dict(kind="polynomial", begin=0, end=10**8, every=1)
  prune = lambda sched: dict(method="magnitude", sparsity=0.9, pattern=PRUNE_PATTERN,
                             schedule=sched)
  int8 = dict(bits=8, pattern=QUANT_PATTERN)
  methods = {
      "dense": ({}, None),
      "masks (apply)": (dict(prune=prune(never)), None),
      "masks (recompute)": (dict(prune=prune(always)), None),
      "2:4": (dict(prune=dict(method="n_m", n=2, m=4, pattern=PRUNE_PATTERN)), None),
      "int8 QAT": (dict(quant=int8), None),
      "prune+int8": (dict(prune=prune(never), quant=int8), None),
      "int8 matmuls": (dict(quant=int8), dict(bits=8, mode="int8")),
  }

  steps, states = {}, {}
  for name, (cc, act) in methods.items():
    plan = _plan(cc, cfg)
    init = train.make_init_fn(model, tx, batch, 0, plan, None, act)
    state = jax.jit(init)()
    own = jax.tree.map(jax.numpy.array, params0)  # a copy: the step donates its state
    state = state.replace(params=own, cstate={**state.cstate, "transforms": jax.jit(
        plan.init)(own, train.cstate_key(0))})
    fn = jax.jit(train.make_train_step(model, tx, schedule, cfg, plan, None, act),
                 donate_argnums=(0,))  # as the harness does
    steps[name] = fn.lower(state, batch).compile()
    states[name] = state

  # distillation: the half-size student (1 block per tower, 1 fusion layer) with and without
  # the teacher's forward in its step
  import dataclasses
  s_cfg = dataclasses.replace(
      cfg, towers={m: dataclasses.replace(t, num_layers=1) for m, t in cfg.towers.items()},
      fusion=dataclasses.replace(cfg.fusion, num_layers=1))
  student = MultimodalModel(s_cfg)
  dist = Distill(model, 2.0, 0.5, ("pooled",), 1.0)
  for name, d in (("student", None), ("student + distill", dist)):
    init = train.make_init_fn(student, tx, batch, 0, _plan({}, s_cfg), d)
    state = jax.jit(init)(params0 if d else None)
    fn = jax.jit(train.make_train_step(student, tx, schedule, s_cfg, _plan({}, s_cfg), d),
                 donate_argnums=(0,))
    if d is None:
      steps[name] = fn.lower(state, batch).compile()
    else:
      compiled = fn.lower(state, batch, params0).compile()
      steps[name] = lambda s, b, c=compiled: c(s, b, params0)
    states[name] = state
  student_flops = _flops(jax.jit(train.make_train_step(
      student, tx, schedule, s_cfg, _plan({}, s_cfg))).lower(states["student"], batch).compile())
  teacher_fwd_flops = _flops(jax.jit(lambda p, b: model.apply({"params": p}, b)[0]).lower(
      params0, batch).compile())

  # inference: the fp32 forward against the int8 path (int8 weights and inputs,
  # int8 x int8 -> int32), on calibrated ranges
  import flax.linen as nn

  from mmjax.compress import activations, quant, rules
  from mmjax.compress.core import Plan as _Plan, flatten as _flatten
  q_plan = _Plan(rules([(QUANT_PATTERN, quant.weights(8))], list(_flatten(params0))))
  q_view = jax.jit(q_plan.forward)(params0, q_plan.init(params0, jax.random.key(0)))
  scales = activations.scales_from_amax(activations.calibrate(model, params0, [batch]))

  def fwd_int8(p, b):
    with nn.intercept_methods(activations.interceptor(scales, 8, "int8")):
      return model.apply({"params": p}, b)[0]

  fwd32 = jax.jit(lambda p, b: model.apply({"params": p}, b)[0])
  fwd8 = jax.jit(fwd_int8)
  steps["forward fp32"] = lambda s, b: (s, fwd32(params0, b))
  steps["forward int8"] = lambda s, b: (s, fwd8(q_view, b))
  states["forward fp32"] = states["forward int8"] = None

  # the teacher's forward alone, timed like a step: a time-based prediction next to FLOPs
  teacher_fwd = jax.jit(lambda p, b: model.apply({"params": p}, b)[0])
  steps["teacher forward"] = lambda s, b: (s, teacher_fwd(params0, b))
  states["teacher forward"] = None
  names = list(steps)
  times = {n: [] for n in names}
  for n in names:  # warm up
    for _ in range(2):
      states[n], m = steps[n](states[n], batch)
      jax.block_until_ready(m)
  for r in range(args.reps):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      t0 = time.perf_counter()
      states[n], m = steps[n](states[n], batch)
      jax.block_until_ready((states[n], m))
      times[n].append(time.perf_counter() - t0)
  med = {n: statistics.median(v) for n, v in times.items()}
  rows = []
  for n in names:
    base = (med["student"] if n.startswith(("student", "teacher")) else
            med["forward fp32"] if n.startswith("forward") else med["dense"])
    rows.append(dict(method=n, median_ms=1e3 * med[n], ratio=med[n] / base))
  prediction = 1.0 + teacher_fwd_flops / student_flops
  time_prediction = 1.0 + med["teacher forward"] / med["student"]
  distill_ratio = med["student + distill"] / med["student"]

  # bytes on disk
  disk = {}
  with tempfile.TemporaryDirectory() as tmp:
    export.export(params0, os.path.join(tmp, "dense"))
    disk["dense fp32"] = export.disk_bytes(os.path.join(tmp, "dense"))
    for name, cc in (("int8", dict(quant=int8)),
                     ("2:4 + int8", dict(prune=dict(method="n_m", n=2, m=4,
                                                    pattern=PRUNE_PATTERN), quant=int8)),
                     ("90% + int8", dict(prune=prune(dict(kind="one_shot", begin=0)),
                                         quant=int8))):
      plan = _plan(cc, cfg)
      st = jax.jit(plan.init)(params0, train.cstate_key(0))
      export.export(params0, os.path.join(tmp, name), plan, st)
      disk[name] = export.disk_bytes(os.path.join(tmp, name))

  print(f"small model, batch {args.batch_size}, {jax.default_backend()}, "
        f"median of {args.reps} interleaved rounds")
  print(f"{'method':22s} {'median ms':>10s} {'ratio':>7s}")
  for r in rows:
    note = (" (vs student step)" if r["method"] in ("student + distill", "teacher forward")
            else " (vs fp32 forward)" if r["method"].startswith("forward") else "")
    print(f"{r['method']:22s} {r['median_ms']:10.1f} {r['ratio']:7.3f}{note}")
  print(f"distillation prediction 1 + teacher fwd / student step FLOPs = {prediction:.3f} "
        f"({teacher_fwd_flops / 1e9:.2f} / {student_flops / 1e9:.2f} GFLOP); measured / "
        f"predicted = {distill_ratio / prediction:.3f}; by time, 1 + teacher forward / student "
        f"step = {time_prediction:.3f}, measured / that = {distill_ratio / time_prediction:.3f}")
  print(f"bytes on disk ({source}):")
  for k, v in disk.items():
    print(f"  {k:12s} {v:>12,d}  dense/this = {disk['dense fp32'] / v:6.2f}")
  result = dict(backend=jax.default_backend(), batch_size=args.batch_size, reps=args.reps,
                steps=rows, distill_prediction=prediction, distill_ratio=distill_ratio,
                distill_time_prediction=time_prediction,
                teacher_fwd_gflop=teacher_fwd_flops / 1e9, student_step_gflop=student_flops / 1e9,
                disk_bytes=disk, disk_ratio={k: disk["dense fp32"] / v for k, v in disk.items()},
                weights=source)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
