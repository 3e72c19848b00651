"""What the post-training methods cost, how they compare with Qwix's GPTQ, and what the
low-bit weight paths cost at inference.

  python bench/post_training.py --init <dense small run> [--qwix] [--reps 9] \
      [--out bench/out/post_training.json]
  python bench/post_training.py --base [--modes parallel,sequential]   # timing only

`small` (the trained run of --init, its 84 block kernels, 128 calibration examples of its
training split): wall time of each method's calibration (`Plan.start` + `Plan.calibrate`,
statistics + solves), first call (compiles included) and a second call (compiled), and
the process's peak RSS after it. `--qwix`: Qwix's GPTQ (`qwix.contrib.gptq_core`, a
bench extra) and mmjax's on the same kernels and the same Hessians (4 bits, groups of 32,
which divide every kernel's inputs): time and reconstruction error Σ tr(ΔᵀHΔ) against
round-to-nearest's. Inference: the forward of batch 64 in fp32, from a W4 g128 export
through `lowbit.weight_only` (4-bit codes two per byte, unpacked and dequantized inside
the jitted program) and from an fp8 e4m3 export the same way, medians of --reps
interleaved rounds, ratios to fp32.

`--base`: random weights of the `base` preset (3 towers x 12 blocks, fusion 2 layers: 294
kernels), random inputs, 128 examples: GPTQ 4-bit g128 and SparseGPT 50% on every kernel,
in each of `--modes`, wall time of the whole calibration and peak RSS (run it in a process
of its own: RSS is the process's peak).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import results_file  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _methods():
  from mmjax.compress import activations, formats, pruning, rules
  from mmjax.compress.post_training import awq, gptq, rtn, smoothquant, sparsegpt, wanda
  from mmjax.models.family import PRUNE_PATTERN as P
  g4 = formats.grid("int", 4, granularity="group", group_size=128, ragged=True)
  return {
      "rtn w4 g128": [rules([(P, rtn.method(g4))])],
      "gptq w4 g128 (sequential)": [rules([(P, gptq.method(g4))])],
      "gptq w4 g128 (parallel)": [rules([(P, gptq.method(g4, mode="parallel"))])],
      "awq w4 g128": [rules([(P, awq.method(g4))])],
      "smoothquant w8a8": [rules([(P, smoothquant.method(0.5))])],
      "rtn w8a8": [rules([(P, rtn.method(formats.grid("int", 8)))]),
                   rules([(P, activations.inputs(8))])],
      "magnitude 50%": [rules([(P, pruning.unstructured(0.5))])],
      "wanda 50%": [rules([(P, wanda.method(0.5))])],
      "sparsegpt 50% (sequential)": [rules([(P, sparsegpt.method(0.5))])],
      "sparsegpt 50% (parallel)": [rules([(P, sparsegpt.method(0.5, mode="parallel"))])],
  }


def time_methods(session, log):
  from mmjax.compress import Plan
  out = {}
  for name, parts in _methods().items():
    times = []
    for _ in range(2):
      plan = Plan(*parts)
      t0 = time.perf_counter()
      params, cstate = session.compress(plan)
      jax.block_until_ready((params, cstate))
      times.append(time.perf_counter() - t0)
    out[name] = dict(first_s=times[0], second_s=times[1], peak_rss_gib=peak_rss_gib())
    log(f"  {name:28s} first {times[0]:7.1f} s  compiled {times[1]:7.1f} s  "
        f"peak RSS {out[name]['peak_rss_gib']:.2f} GiB")
  return out


def vs_qwix(session, log):
  """mmjax's and Qwix's GPTQ on the same kernels and Hessians."""
  from qwix._src.core import qarray
  from qwix.contrib import gptq_core
  from mmjax.compress import flatten, formats
  from mmjax.compress.post_training import obs, stats
  from mmjax.models.family import PRUNE_PATTERN
  flat = flatten(session.params)
  paths = sorted(p for p in flat if re.fullmatch(PRUNE_PATTERN, p))
  st, _ = stats.collect(session.apply, session.params, session.calibration, paths, ("gram",))
  grid = formats.grid("int", 4, granularity="group", group_size=32)
  how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=(0,), tiled_axes={1: 32})
  ours = jax.jit(lambda w, h: obs.solve(w, h, grid=grid).w)
  theirs = jax.jit(lambda w, h: qarray.dequantize(gptq_core.quantize_weight(w.T, h, how)[0]).T)

  def err(w, q, h):
    d = w - q
    return float(jnp.sum((h @ d) * d))

  # each library's RTN on its own grid: mmjax's symmetric int4 has 15 levels (-7..7,
  # scale max|w| / 7), Qwix's 16 (-8..7, scale max|w| / 7.5)
  qwix_rtn = jax.jit(lambda w: qarray.dequantize(qarray.quantize(w.T, how)).T)
  res = {k: dict(first_s=0.0, second_s=0.0, err=0.0, rtn_err=0.0) for k in ("mmjax", "qwix")}
  for p in paths:
    w, h = jnp.asarray(flat[p], jnp.float32), st[p]["gram"]
    res["mmjax"]["rtn_err"] += err(w, grid.round_matrix(w, *grid.fit(w)), h)
    res["qwix"]["rtn_err"] += err(w, qwix_rtn(w), h)
    for name, fn in (("mmjax", ours), ("qwix", theirs)):
      for key in ("first_s", "second_s"):
        t0 = time.perf_counter()
        q = jax.block_until_ready(fn(w, h))
        res[name][key] += time.perf_counter() - t0
      res[name]["err"] += err(w, q, h)
  for name in res:
    res[name]["err_vs_own_rtn"] = res[name]["err"] / res[name]["rtn_err"]
    res[name]["err_vs_mmjax_rtn"] = res[name]["err"] / res["mmjax"]["rtn_err"]
    log(f"  {name:6s} GPTQ w4 g32 on {len(paths)} kernels: first {res[name]['first_s']:.1f} s,"
        f" compiled {res[name]['second_s']:.1f} s, error {res[name]['err_vs_own_rtn']:.3f}x "
        f"its own grid's RTN, {res[name]['err_vs_mmjax_rtn']:.3f}x mmjax's RTN")
  res["kernels"] = len(paths)
  return res


def inference(session, reps, log):
  """fp32 forward vs the low-bit weight-only paths, batch 64, interleaved."""
  from mmjax.compress import Plan, export, flatten, formats, lowbit, rules, unflatten
  from mmjax.compress.post_training import gptq, rtn
  from mmjax.models.family import PRUNE_PATTERN as P
  batch = session.family.example_batch(64, seed=1)
  fns = {"fp32": (jax.jit(lambda p, b: session.apply(p, b)[0]), (session.params,))}
  for name, method in (("int4 g128 weight-only (GPTQ export)", gptq.method(formats.grid(
      "int", 4, granularity="group", group_size=128, ragged=True), mode="parallel")),
                       ("fp8 e4m3 weight-only (export)", rtn.method(formats.grid("fp8_e4m3")))):
    plan = Plan(rules([(P, method)]))
    params, cstate = session.compress(plan)
    with tempfile.TemporaryDirectory() as d:
      export.export(params, d, plan, cstate)
      codes = export.load_grid_codes(d)
      rest = unflatten(lowbit.placeholders(flatten(export.load(d)), codes))
    arrays, _ = lowbit.split(codes)
    served = jax.jit(lambda p, a, b, f=lowbit.weight_only(lambda p, b: session.apply(p, b)[0],
                                                          codes): f(p, a, b))
    want = jax.jit(lambda p, b: plan.apply(lambda q, x: session.apply(q, x)[0], p, cstate)(b))(
        params, batch)
    got = served(rest, arrays, batch)
    fns[name] = (served, (rest, arrays))
    log(f"  {name}: max |logit - view's| {float(jnp.max(jnp.abs(got - want))):.2e}")
  for f, args in fns.values():  # compile and warm
    jax.block_until_ready(f(*args, batch))
  times = {k: [] for k in fns}
  order = list(fns)
  for r in range(reps):
    for k in order[r % len(order):] + order[:r % len(order)]:
      f, args = fns[k]
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args, batch))
      times[k].append(time.perf_counter() - t0)
  base = statistics.median(times["fp32"])
  out = {}
  for k, ts in times.items():
    out[k] = dict(median_ms=1e3 * statistics.median(ts), ratio=statistics.median(ts) / base)
    log(f"  {k:38s} {out[k]['median_ms']:8.1f} ms  {out[k]['ratio']:.3f}x fp32")
  return out


def base_timing(modes, log):
  """GPTQ and SparseGPT on every kernel of `base` (random weights and inputs), each whole
  calibration (statistics and solves) timed in each mode; sequential also reports its cut
  (`staged`): levels, and the equations its passes run in forwards' worth."""
  from mmjax.compress import Plan, flatten, formats, rules
  from mmjax.compress.post_training import gptq, sparsegpt
  from mmjax.models import MultimodalModel, get_preset, random_inputs
  from mmjax.models.family import PRUNE_PATTERN as P
  cfg = get_preset("base")
  model = MultimodalModel(cfg)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), random_inputs(cfg, 1))[
      "params"])()
  batches = [random_inputs(cfg, 32, seed=s) for s in range(4)]  # 128 examples
  apply = lambda p, b: model.apply({"params": p}, b)
  g4 = formats.grid("int", 4, granularity="group", group_size=128)
  out = {"kernels": sum(1 for p in flatten(params) if re.fullmatch(P, p))}
  if "sequential" in modes:
    out["sequential_cut"] = sequential_cut(apply, params, batches, P, log)
  for mode in modes:
    for name, m in (("gptq w4 g128", gptq.method(g4, mode=mode)),
                    ("sparsegpt 50%", sparsegpt.method(0.5, mode=mode))):
      plan = Plan(rules([(P, m)]))
      t0 = time.perf_counter()
      p, cs = plan.start(params, jax.random.PRNGKey(0))
      p, cs = plan.calibrate(apply, p, cs, batches)
      jax.block_until_ready((p, cs))
      s = time.perf_counter() - t0
      out[f"{name} ({mode})"] = dict(s=s, peak_rss_gib=peak_rss_gib())
      log(f"  base {name} ({mode}): {s:.0f} s, peak RSS {peak_rss_gib():.2f} GiB")
  return out


def sequential_cut(apply, params, batches, pattern, log):
  """The passes and the cut forward of sequential mode on `base`: levels, and how many
  equations the passes run together against one forward (1.0) and against re-running the
  whole forward per level (levels x 1.0)."""
  from mmjax.compress import flatten, layout
  from mmjax.compress.post_training import passes, staged
  paths = [p for p in flatten(params) if re.fullmatch(pattern, p)]
  t0 = time.perf_counter()
  closed = jax.make_jaxpr(apply)(params, batches[0])
  groups, levels = passes.solve_order(apply, params, batches[0], paths, closed=closed)
  cut = staged.build(apply, params, list(flatten(params)), batches[:1], paths, levels,
                     ("gram",), lambda path, ndim: layout.contract_axes(None, path, ndim),
                     closed)
  plan_s = time.perf_counter() - t0
  pl = cut.pl
  forwards = sum(len(r) for r in pl.runs) / len(pl.ops)
  res = dict(blocks=len(groups), levels=len(levels), equations=len(pl.ops),
             forwards_run=forwards, plan_s=plan_s)
  log(f"  base sequential: {len(groups)} blocks in {len(levels)} levels; the cut passes "
      f"run {forwards:.2f} forwards' worth of the {len(pl.ops)} equations (uncut: "
      f"{len(levels)}); passes and cut {plan_s:.1f} s")
  return res


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--init", default=None, help="a trained dense `small` run's workdir")
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--qwix", action="store_true", help="compare with Qwix's GPTQ")
  ap.add_argument("--base", action="store_true", help="time GPTQ/SparseGPT on base")
  ap.add_argument("--modes", default="parallel", help="--base: parallel,sequential")
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--out", default="bench/out/post_training.json")
  args = ap.parse_args()
  log = print
  result = dict(backend=jax.default_backend(), devices=len(jax.devices()))
  if args.base:
    result["base"] = base_timing([m for m in args.modes.split(",") if m], log)
  else:
    if not args.init:
      ap.error("--init (a trained dense small run) is required without --base")
    from experiments.one_shot import Session
    session = Session(args.init, data_dir=args.data_dir)
    log(f"small: {args.init}, 128 calibration examples")
    result["methods"] = time_methods(session, log)
    if args.qwix:
      result["qwix"] = vs_qwix(session, log)
    result["inference"] = inference(session, args.reps, log)
  results_file.write(args.out, result, log)


if __name__ == "__main__":
  main()
