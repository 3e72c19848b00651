"""What compression costs per train step, and what it saves on disk.

  python bench/compress_overhead.py [--init workdirs/dense] [--reps 15] \
      [--out bench/out/compress_overhead.json]

Builds the real harness train step (`mmjax.harness.train.make_steps`, the model-agnostic
`mmjax.compress.step` with mmjax's loss, jitted with the state donated, as the harness
does) of the `small` model for each method, its state from `steps.init` on the same
weights, and times them interleaved in one process (method order rotated every round),
median over `--reps` rounds, each divided by the dense step's median:

  masks (apply)      gradual magnitude pruning on a step that only applies its masks: the
                     mask is applied to the master weights by `plan.update` after the
                     optimizer step, so it fuses into the optimizer's elementwise update
                     (no masking in the forward)
  masks (recompute)  the step that recomputes every mask (exact top-k by bisection)
  2:4                N:M masks
  int8 QAT           per-channel weight fake-quant, straight-through
  prune+int8         both
  int8 matmuls       int8 QAT plus `activations.inputs(8, "int8")` on every matmul weight
                     (ACT_PATTERN): int8 x int8 -> int32 forward, float straight-through
                     backward; input scales calibrated once on the batch before timing
  int8 matmuls+grads the same with the backward matmuls (dX, dW) in int8 too
  distill            the half-size student's step with the dense teacher's forward inside
                     (`distill.method`, the teacher a frozen input of the step), against the
                     student's own step and the prediction
                     1 + teacher forward FLOPs / student step FLOPs (XLA cost analysis)
  self-distill       the small model taught by itself (the combined pipeline's setting),
                     against the dense step and 1 + forward FLOPs / step FLOPs
  forward int8       inference: `activations.apply_quantized(apply, scales, 8, "int8")` on
                     the int8 weight view (scales calibrated on the batch), against the fp32
                     forward
  and the achieved GFLOP/s of each piece, which is where a FLOP prediction goes wrong

Then exports (the same writer as every run) the dense fp32 weights (raw, 4 bytes a
parameter, and zstd'd as Orbax writes by default) and the int8, 2:4 + int8 and 90% + int8
versions, and reports bytes on disk and their ratios to both references. With
`--init`, the weights are that trained run's; otherwise a fresh initialisation (said so).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import results_file  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402


def _batch(cfg, batch_size):
  from mmjax.models import random_inputs
  b = random_inputs(cfg, batch_size, seed=0)
  b["label"] = np.random.default_rng(0).integers(0, 10, batch_size).astype(np.int32)
  b["example_mask"] = np.ones(batch_size, bool)
  return {k: jax.numpy.asarray(v) for k, v in b.items()}


def _plan(cfg_compress, model_cfg, *extra):
  """The plan `config.compress = cfg_compress` builds (checked against the model's
  parameter shapes), then the parts in `extra`."""
  from mmjax.compress import Plan
  from mmjax.harness import compress_config
  from mmjax.models import family
  return Plan(compress_config.build({"compress": cfg_compress}, family.of(model_cfg)).plan,
              *extra)


def _copy(tree):
  return jax.tree.map(jax.numpy.array, tree)  # a copy: the step donates its state


def _build(model_cfg, tx, lr_schedule, plan, params, batch, frozen=None):
  """-> (Steps, TrainState): the harness's step for `plan` and its state on `params` (a
  copy), as `train_and_evaluate` starts it (`steps.init` applies `plan.start`)."""
  from mmjax.harness import task, train
  from mmjax.models import family
  fam = family.of(model_cfg)
  steps = train.make_steps(fam, task.from_config({}, fam), tx, lr_schedule, plan)
  state = jax.jit(steps.init)(_copy(params), jax.random.PRNGKey(0), batch, frozen)
  return steps, state


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _distillation(med, teacher_fwd_flops, student_flops, dense_flops):
  """Measured distillation overheads against their FLOP and time predictions, and the rate
  (GFLOP/s) each piece runs at: where a FLOP-count prediction goes wrong."""
  prediction = 1.0 + teacher_fwd_flops / student_flops
  time_prediction = 1.0 + med["teacher forward"] / med["student"]
  distill_ratio = med["student + distill"] / med["student"]
  self_prediction = 1.0 + teacher_fwd_flops / dense_flops
  self_time_prediction = 1.0 + med["teacher forward"] / med["dense"]
  self_ratio = med["self-distill"] / med["dense"]
  rates = {"teacher forward": teacher_fwd_flops / med["teacher forward"] / 1e9,
           "student step": student_flops / med["student"] / 1e9,
           "dense step": dense_flops / med["dense"] / 1e9}
  print(f"distillation prediction 1 + teacher fwd / student step FLOPs = {prediction:.3f} "
        f"({teacher_fwd_flops / 1e9:.2f} / {student_flops / 1e9:.2f} GFLOP); measured / "
        f"predicted = {distill_ratio / prediction:.3f}; by time, 1 + teacher forward / student "
        f"step = {time_prediction:.3f}, measured / that = {distill_ratio / time_prediction:.3f}")
  print(f"self-distillation (small taught by small): prediction 1 + teacher fwd / step FLOPs "
        f"= {self_prediction:.3f}; measured {self_ratio:.3f}, measured / predicted = "
        f"{self_ratio / self_prediction:.3f}; by time {self_time_prediction:.3f}, measured / "
        f"that = {self_ratio / self_time_prediction:.3f}")
  print("where the time goes (XLA-counted GFLOP / median s): " +
        ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()))
  return dict(distill_prediction=prediction, distill_ratio=distill_ratio,
              distill_time_prediction=time_prediction,
              self_distill_prediction=self_prediction, self_distill_ratio=self_ratio,
              self_distill_time_prediction=self_time_prediction, gflop_per_s=rates,
              dense_step_gflop=dense_flops / 1e9, teacher_fwd_gflop=teacher_fwd_flops / 1e9,
              student_step_gflop=student_flops / 1e9)


def _disk(params0, cfg, prune, int8, source):
  """Bytes on disk of exports (the writer every run uses) against raw and zstd'd fp32."""
  from mmjax.compress import export
  from mmjax.models.family import PRUNE_PATTERN
  disk = {}
  with tempfile.TemporaryDirectory() as tmp:
    export.export(params0, os.path.join(tmp, "raw"), zstd=False)
    disk["dense fp32 raw"] = export.disk_bytes(os.path.join(tmp, "raw"))
    export.export(params0, os.path.join(tmp, "dense"))
    disk["dense fp32 zstd"] = export.disk_bytes(os.path.join(tmp, "dense"))
    for name, cc in (("int8", dict(quant=int8)),
                     ("2:4 + int8", dict(prune=dict(method="n_m", n=2, m=4,
                                                    pattern=PRUNE_PATTERN), quant=int8)),
                     ("90% + int8", dict(prune=prune(dict(kind="one_shot", begin=0)),
                                         quant=int8))):
      plan = _plan(cc, cfg)
      # the key steps.init gives plan.start: fold_in(PRNGKey(0), 2)
      pruned, st = jax.jit(plan.start)(params0, jax.random.fold_in(jax.random.PRNGKey(0), 2))
      export.export(pruned, os.path.join(tmp, name), plan, st)
      disk[name] = export.disk_bytes(os.path.join(tmp, name))
  print(f"bytes on disk ({source}):")
  for k, v in disk.items():
    print(f"  {k:15s} {v:>12,d}  raw fp32 / this = {disk['dense fp32 raw'] / v:6.2f}   "
          f"zstd fp32 / this = {disk['dense fp32 zstd'] / v:6.2f}")
  return dict(disk_bytes=disk,
              disk_ratio={k: disk["dense fp32 raw"] / v for k, v in disk.items()},
              disk_ratio_zstd={k: disk["dense fp32 zstd"] / v for k, v in disk.items()})


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--init", default=None, help="a trained dense run's workdir")
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--out", default="bench/out/compress_overhead.json")
  ap.add_argument("--only", default=None,
                  help="comma-separated method names: time just these against dense (an A/B "
                       "with fewer neighbours), skip distillation, inference and disk")
  args = ap.parse_args()

  import optax

  from mmjax.compress import Plan, activations, distill, flatten, match_paths, quant, rules
  from mmjax.harness import checkpointing
  from mmjax.models import MultimodalModel, get_preset
  from mmjax.models.family import ACT_PATTERN, PRUNE_PATTERN, QUANT_PATTERN

  cfg = get_preset("small")
  model = MultimodalModel(cfg)
  batch = _batch(cfg, args.batch_size)
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  lr_schedule = lambda s: 1e-3
  params0 = jax.jit(model.init)(jax.random.key(0), batch)["params"]
  source = "fresh initialisation"
  if args.init:
    reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(args.init), read_only=True)
    params0 = jax.device_get(reader.restore_local(reader.latest_step())["params"])
    reader.close()
    source = f"trained weights from {args.init}"

  once = dict(kind="one_shot", begin=0)  # 90% masks at step 0, only applied afterwards
  always = dict(kind="polynomial", begin=0, end=10**8, every=1)
  prune = lambda ramp: dict(method="magnitude", sparsity=0.9, pattern=PRUNE_PATTERN,
                            ramp=ramp)
  int8 = dict(bits=8, pattern=QUANT_PATTERN)
  # the inputs of every matmul weight's product in int8 (weights int8 by the QAT part)
  int8_inputs = lambda grads: rules([(ACT_PATTERN, activations.inputs(8, "int8",
                                                                      int8_grads=grads))])
  methods = {
      "dense": ({}, None),
      "masks (apply)": (dict(prune=prune(once)), None),
      "masks (recompute)": (dict(prune=prune(always)), None),
      "2:4": (dict(prune=dict(method="n_m", n=2, m=4, pattern=PRUNE_PATTERN)), None),
      "int8 QAT": (dict(quant=int8), None),
      "prune+int8": (dict(prune=prune(once), quant=int8), None),
      "int8 matmuls": (dict(quant=int8), int8_inputs(False)),
      "int8 matmuls+grads": (dict(quant=int8), int8_inputs(True)),
  }
  full = args.only is None
  if not full:
    wanted = [m.strip() for m in args.only.split(",")]
    unknown = sorted(set(wanted) - set(methods))
    if unknown:
      ap.error(f"--only: unknown method(s) {unknown}; valid: {sorted(methods)}")
    methods = {k: v for k, v in methods.items() if k == "dense" or k in wanted}

  apply = lambda p, b: model.apply({"params": p}, b)  # (logits, intermediates)
  steps, states, built = {}, {}, {}
  for name, (cc, act) in methods.items():
    plan = _plan(cc, cfg, *([act] if act is not None else []))
    built[name], state = _build(cfg, tx, lr_schedule, plan, params0, batch)
    if plan.needs_calibration(list(flatten(params0))):  # activation scales start at 1.0
      params, cstate = plan.calibrate(apply, state.params, state.cstate, [batch])
      state = state.replace(params=params, cstate=cstate)
    fn = jax.jit(built[name].train_step, donate_argnums=(0,))  # as the harness does
    steps[name] = fn.lower(state, batch).compile()
    states[name] = state

  if full:
    # distillation: the half-size student (1 block per tower, 1 fusion layer) with and without
    # the teacher's forward in its step; the teacher's params are the step's frozen input
    import dataclasses
    s_cfg = dataclasses.replace(
        cfg, towers={m: dataclasses.replace(t, num_layers=1) for m, t in cfg.towers.items()},
        fusion=dataclasses.replace(cfg.fusion, num_layers=1))
    student = MultimodalModel(s_cfg)
    s_params = jax.jit(student.init)(jax.random.fold_in(jax.random.PRNGKey(0), 1),
                                     batch)["params"]
    dplan = Plan(distill.method(apply, temperature=2.0, alpha=0.5, features=("pooled",),
                                feature_weight=1.0))
    frozen = {"distill": params0}
    for name, plan in (("student", Plan()), ("student + distill", dplan)):
      d = name != "student"
      built[name], state = _build(s_cfg, tx, lr_schedule, plan, s_params, batch,
                                  frozen if d else None)
      fn = jax.jit(built[name].train_step, donate_argnums=(0,))
      if not d:
        steps[name] = fn.lower(state, batch).compile()
      else:
        compiled = fn.lower(state, batch, frozen).compile()
        steps[name] = lambda s, b, c=compiled: c(s, b, frozen)
      states[name] = state
    # self-distillation (the combined pipeline's): the small model, started from the
    # teacher's weights as the pipeline starts it, taught by itself
    built["self-distill"], states["self-distill"] = _build(cfg, tx, lr_schedule, dplan,
                                                           params0, batch, frozen)
    compiled = jax.jit(built["self-distill"].train_step, donate_argnums=(0,)).lower(
        states["self-distill"], batch, frozen).compile()
    steps["self-distill"] = lambda s, b, c=compiled: c(s, b, frozen)
    dense_flops = _flops(jax.jit(built["dense"].train_step).lower(states["dense"], batch)
                         .compile())
    student_flops = _flops(jax.jit(built["student"].train_step).lower(states["student"], batch)
                           .compile())
    teacher_fwd_flops = _flops(jax.jit(lambda p, b: apply(p, b)[0]).lower(
        params0, batch).compile())

    # inference: the fp32 forward against the int8 path (int8 weights and inputs,
    # int8 x int8 -> int32), on calibrated ranges
    paths = list(flatten(params0))
    q_plan = Plan(rules([(QUANT_PATTERN, quant.weights(8))], paths))
    q_view = jax.jit(q_plan.view)(params0, q_plan.init(params0, jax.random.key(0)))
    scales = activations.scales_from_amax(activations.calibrate(
        apply, params0, [batch], match_paths(ACT_PATTERN, paths)))
    apply8 = activations.apply_quantized(apply, scales, 8, "int8")

    fwd32 = jax.jit(lambda p, b: apply(p, b)[0])
    fwd8 = jax.jit(lambda p, b: apply8(p, b)[0])
    steps["forward fp32"] = lambda s, b: (s, fwd32(params0, b))
    steps["forward int8"] = lambda s, b: (s, fwd8(q_view, b))
    states["forward fp32"] = states["forward int8"] = None

    # the teacher's forward alone, timed like a step: a time-based prediction next to FLOPs
    teacher_fwd = jax.jit(lambda p, b: apply(p, b)[0])
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
  result = dict(backend=jax.default_backend(), batch_size=args.batch_size, reps=args.reps,
                steps=rows, weights=source)
  print(f"small model, batch {args.batch_size}, {jax.default_backend()}, "
        f"median of {args.reps} interleaved rounds")
  print(f"{'method':26s} {'median ms':>10s} {'ratio':>7s}")
  for r in rows:
    note = (" (vs student step)" if r["method"] in ("student + distill", "teacher forward")
            else " (vs fp32 forward)" if r["method"].startswith("forward") else "")
    print(f"{r['method']:26s} {r['median_ms']:10.1f} {r['ratio']:7.3f}{note}")
  if full:
    result.update(_distillation(med, teacher_fwd_flops, student_flops, dense_flops))
    result.update(_disk(params0, cfg, prune, int8, source))
  results_file.write(args.out, result)


if __name__ == "__main__":
  main()
