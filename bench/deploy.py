"""What deployable artifacts cost and how fast integer inference is, on `small`.

  python bench/deploy.py [--init <dense small run>] [--reps 15] [--out bench/out/deploy.json]

Three artifacts of the same weights (a trained dense run with --init, else random
weights: timing only), written by `mmjax.compress.artifact` for cpu and loaded by their own
serve.py: fp32 (the dense checkpoint), int8 W8A8 (int8 per-channel weights, int8 inputs
of every Dense product calibrated on one batch: int8 x int8 -> int32 from the stored
codes) and int4 weight-only (RTN, groups of 128, codes two per byte, dequantized in the
program). For each: bytes, load time (manifest + sha256 + deserialize + weights), first
call (its compile) and steady-state latency at batch 1, throughput at batch 64.

Then the forward of batch 64 in process, medians of interleaved rounds, ratios to fp32,
with a breakdown of where the int8 forward's time goes:
  fp32                the model as trained
  int8 (requantize)   what the harness runs (`activations.apply_quantized` on the int8
                      view): each call re-quantizes every weight (max |w|, divide, round)
  int8 (codes)        the artifact's program: products from the stored codes
  int8, no x quant    the same with the inputs cast instead of rounded and clipped (wrong
                      numbers: timing only): the cost of quantizing activations
  no Dense products   every Dense product replaced by a broadcast of its input's first
                      column (timing only): attention, norms, GEGLU, audio features: the
                      time no matmul path can remove
  int4 (dequantize)   weight-only 4-bit (the artifact): every weight dequantized each call
  int4 (lowbit kernel) `lowbit.weight_only`: on GPU/TPU the Pallas kernel (codes unpacked
                      and dequantized inside the matmul); on CPU the same XLA ops as above
fp32 and int8 also run with the batch in quarters in one program (`_in_parts`: smaller
activations stay in cache, which speeds fp32), and on CPU are compiled with XLA:CPU's
other library settings (per compile, `compiler_options`, so in the same process): XLA's
default YNNPACK fusions fuse whole MLPs into one library call and materialize scalar
constants as full arrays there, which slows the fp32 forward. The ratio that counts is
the best int8 against the best fp32.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import results_file  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _serve(directory):
  spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(directory,
                                                                            "serve.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _model(init):
  from mmjax.harness import checkpointing
  from mmjax.models import MultimodalModel, get_preset, random_inputs
  cfg = get_preset("small")
  model = MultimodalModel(cfg)
  if init:
    reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(init), read_only=True)
    params = jax.device_get(reader.restore_local(reader.latest_step())["params"])
    reader.close()
  else:
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), random_inputs(cfg, 1))[
        "params"])()
  apply = lambda p, b: model.apply({"params": p}, b)[0]
  inputs = lambda n, seed=0: random_inputs(cfg, n, seed=seed, with_labels=False)
  return params, apply, inputs


def _plans(params, apply, batch):
  from mmjax.compress import Plan, activations, formats, quant, rules
  from mmjax.compress.post_training import rtn
  from mmjax.models.family import ACT_PATTERN, PRUNE_PATTERN, QUANT_PATTERN
  w8a8 = Plan(rules([(QUANT_PATTERN, quant.weights(8))]),
              rules([(ACT_PATTERN, activations.inputs(8, "int8"))]))
  g4 = formats.grid("int", 4, granularity="group", group_size=128, ragged=True)
  w4 = Plan(rules([(PRUNE_PATTERN, rtn.method(g4))]))
  out = {}
  for name, plan in (("int8 W8A8", w8a8), ("int4 weight-only", w4)):
    p, cs = plan.start(params, jax.random.PRNGKey(0))
    out[name] = (plan, *plan.calibrate(apply, p, cs, [batch]))
  return out


def _time(fn, reps):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def artifacts(params, apply, inputs, plans, tmp, reps, log):
  from mmjax.compress import artifact, export, flatten
  dirs, rows = {}, {}
  example = inputs(1)
  bufs, meta = artifact.weights_from_params(flatten(params))
  dirs["fp32"] = os.path.join(tmp, "fp32")
  artifact.write(dirs["fp32"], apply, bufs, meta, example, ("cpu",))
  for name, (plan, p, cs) in plans.items():
    exp_dir = os.path.join(tmp, name.split()[0] + "_export")
    export.export(p, exp_dir, plan, cs)
    dirs[name] = os.path.join(tmp, name.split()[0])
    artifact.write(dirs[name], apply, *artifact.weights_from_export(exp_dir), example,
                   ("cpu",))
  b1, b64 = inputs(1, seed=1), inputs(64, seed=2)
  log(f"{'artifact':18s} {'bytes':>11s} {'load':>8s} {'1st call b1':>12s} "
      f"{'latency b1':>11s} {'ex/s b64':>9s}")
  for name, d in dirs.items():
    serve = _serve(d)
    t0 = time.perf_counter()
    model = serve.load(d)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(model(b1))
    first_s = time.perf_counter() - t0
    lat = _time(lambda: model(b1), reps)
    jax.block_until_ready(model(b64))
    thr = 64 / _time(lambda: model(b64), reps)
    rows[name] = dict(bytes=model.manifest["bytes"], load_s=load_s, first_call_s=first_s,
                      latency_b1_ms=1e3 * lat, throughput_b64=thr)
    log(f"{name:18s} {rows[name]['bytes']:11,d} {load_s:7.2f}s {first_s:11.2f}s "
        f"{1e3 * lat:9.1f}ms {thr:9.0f}")
  return rows


# XLA:CPU library settings tried per compile on CPU (DebugOptions fields, jaxlib 0.10):
# YNNPACK for single dots only, oneDNN for the float dots beside it
XLA_CPU_SETTINGS = {
    "YNNPACK single dots": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "oneDNN dots + YNNPACK single dots": {
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def _in_parts(f, n):
  """f(weights, batch) as n forwards of consecutive slices of the batch, in one program
  (each example's logits depend on it alone, so the outputs are the same)."""
  def g(w, batch):
    size = len(jax.tree.leaves(batch)[0])
    part = lambda i: jax.tree.map(lambda v: v[i * size // n:(i + 1) * size // n], batch)
    return jnp.concatenate([f(w, part(i)) for i in range(n)], 0)
  return g


def forwards(params, apply, inputs, plans, reps, log):
  from mmjax.compress import activations, artifact, export, flatten, intercept, lowbit
  from mmjax.compress import unflatten
  from mmjax.models.family import ACT_PATTERN
  batch = inputs(64, seed=2)
  plan8, p8, cs8 = plans["int8 W8A8"]
  view8 = jax.jit(plan8.view)(p8, cs8)
  scales = dict(cs8["act8_int8"])  # the activation method's state: {path: input scale}
  paths = [p for p in flatten(params) if re.fullmatch(ACT_PATTERN, p)]
  with tempfile.TemporaryDirectory() as tmp:
    export.export(p8, tmp, plan8, cs8)
    bufs8, meta8 = artifact.weights_from_export(tmp)
  plan4, p4, cs4 = plans["int4 weight-only"]
  with tempfile.TemporaryDirectory() as tmp:
    export.export(p4, tmp, plan4, cs4)
    bufs4, meta4 = artifact.weights_from_export(tmp)
    codes4 = export.load_grid_codes(tmp)
    rest4 = lowbit.placeholders(flatten(export.load(tmp)), codes4)
  arrays4, _ = lowbit.split(codes4)
  served4 = lowbit.weight_only(apply, codes4)  # the Pallas kernel where lowered for GPU/TPU

  def no_x_quant(d: intercept.Dot):  # timing only: inputs cast, not rounded and clipped
    codes = artifact._int_codes(bufs8, meta8[d.path])
    acc = jax.lax.dot_general(d.x.astype(jnp.int8), codes, (((d.x.ndim - 1,), (0,)),
                                                            ((), ())),
                              preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * artifact._get(bufs8, meta8[d.path], "scale")[0]).astype(
        d.out_aval.dtype)

  # each product's output replaced by its input's first column, broadcast: nearly free, and
  # still data-dependent (zeros would let XLA fold away everything after them)
  zeros = lambda d: jnp.broadcast_to(d.x[..., :1], d.out_aval.shape).astype(d.out_aval.dtype)
  fns = {
      "fp32": (jax.jit(apply), (params, batch)),
      "int8 (requantize)": (jax.jit(activations.apply_quantized(apply, scales, 8, "int8")),
                            (view8, batch)),
      "int8 (codes)": (jax.jit(artifact.forward(apply, meta8)), (bufs8, batch)),
      "int8, no x quant": (jax.jit(lambda p, b: intercept.dots(apply, paths, no_x_quant)(
          p, b)), (view8, batch)),
      "no Dense products": (jax.jit(lambda p, b: intercept.dots(apply, paths, zeros)(p, b)),
                            (params, batch)),
      "int4 (dequantize)": (jax.jit(artifact.forward(apply, meta4)), (bufs4, batch)),
      "int4 (lowbit kernel)": (jax.jit(served4), (unflatten(rest4), arrays4, batch)),
  }
  for k in ("fp32", "int8 (codes)"):  # smaller activations stay in cache (fp32 gains)
    f, a = fns[k]
    fns[f"{k}, batch in quarters"] = (jax.jit(_in_parts(f, 4)), a)
  if jax.default_backend() == "cpu":
    for setting, options in XLA_CPU_SETTINGS.items():
      for k in ("fp32", "int8 (codes)"):
        f, a = fns[k]
        fns[f"{k}, {setting}"] = (f.lower(*a).compile(compiler_options=options), a)
  for f, a in fns.values():
    jax.block_until_ready(f(*a))
  ref = np.asarray(fns["int4 (dequantize)"][0](*fns["int4 (dequantize)"][1]))
  got = np.asarray(fns["int4 (lowbit kernel)"][0](*fns["int4 (lowbit kernel)"][1]))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)  # the kernel computes the same
  for k in ("fp32", "int8 (codes)"):  # the split program computes the same
    whole, quarters = (np.asarray(fns[n][0](*fns[n][1])) for n in (k, f"{k}, batch in quarters"))
    np.testing.assert_allclose(quarters, whole, rtol=1e-4, atol=1e-4)
  times = {k: [] for k in fns}
  for r in range(reps):
    names = list(fns)
    for k in names[r % len(names):] + names[:r % len(names)]:
      f, a = fns[k]
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      times[k].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  out = {k: dict(median_ms=1e3 * v, vs_fp32=med["fp32"] / v) for k, v in med.items()}
  best = {p: min((k for k in med if k.split(",")[0] == p), key=med.get)
          for p in ("fp32", "int8 (codes)")}
  out["best"] = dict(fp32=best["fp32"], int8=best["int8 (codes)"],
                     int8_vs_fp32=med[best["fp32"]] / med[best["int8 (codes)"]])
  log(f"\nforward, batch 64, median of {reps} interleaved rounds")
  log(f"{'path':50s} {'ms':>8s} {'speed vs fp32':>14s}")
  for k, v in out.items():
    if k != "best":
      log(f"{k:50s} {v['median_ms']:8.1f} {v['vs_fp32']:13.2f}x")
  log(f"best int8 ({best['int8 (codes)']}) vs best fp32 ({best['fp32']}): "
      f"{out['best']['int8_vs_fp32']:.2f}x")
  rest = med["no Dense products"]
  out["breakdown_ms"] = dict(
      non_matmul=1e3 * rest, fp32_matmuls=1e3 * (med["fp32"] - rest),
      int8_matmuls_and_rescale=1e3 * (med["int8, no x quant"] - rest),
      activation_quantization=1e3 * (med["int8 (codes)"] - med["int8, no x quant"]),
      weight_requantization=1e3 * (med["int8 (requantize)"] - med["int8 (codes)"]))
  log("breakdown (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in out["breakdown_ms"].items()))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--init", default=None, help="a trained dense `small` run (else random)")
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--out", default="bench/out/deploy.json")
  args = ap.parse_args()
  params, apply, inputs = _model(args.init)
  plans = _plans(params, apply, inputs(64, seed=3))
  result = dict(backend=jax.default_backend(), weights=args.init or "random")
  with tempfile.TemporaryDirectory() as tmp:
    result["artifacts"] = artifacts(params, apply, inputs, plans, tmp, args.reps, print)
  result["forward"] = forwards(params, apply, inputs, plans, args.reps, print)
  results_file.write(args.out, result)


if __name__ == "__main__":
  main()
