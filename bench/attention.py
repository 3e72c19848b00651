"""Attention benchmark: time, throughput and compiled temporary memory per implementation.

  python bench/attention.py --out bench/out/attention.json

For each sequence length (self-attention, batch 1, 8 heads, head_dim 64, float32 unless
--dtype) and each
implementation, forward and forward+backward: median wall time, GFLOP/s (model FLOPs:
4·B·H·L²·D forward, 12·B·H·L²·D with the backward; recomputation is not credited), that
rate as a fraction of a jitted float32 matrix product timed in the same process, and
`compiled.memory_analysis().temp_size_in_bytes`. Ratios, not absolute times, are the
figures to compare: this is a shared, noisy machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmjax.kernels.attention import dot_product_attention  # noqa: E402


def median_time(fn, args, reps, min_time=0.2):
  """Median seconds per call after one warm-up; repeats fast calls to fill min_time."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    n, t0 = 0, time.perf_counter()
    while True:
      jax.block_until_ready(fn(*args))
      n += 1
      if time.perf_counter() - t0 >= min_time or n >= 1000:
        break
    times.append((time.perf_counter() - t0) / n)
  return statistics.median(times)


def matmul_rate(reps, dtype=jnp.float32):
  """GFLOP/s of a jitted [2048, 2048] @ [2048, 2048] product in `dtype`."""
  n = 2048
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda a, b: a @ b).lower(a, a).compile()
  return 2 * n ** 3 / median_time(f, (a, a), reps) / 1e9


def bench_one(impl, length, heads, head_dim, backward, reps, blocks, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  shape = (1, length, heads, head_dim)
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
  kw = dict(implementation=impl, q_block_size=blocks[0], kv_block_size=blocks[1])
  if backward:
    fn = jax.grad(lambda q, k, v: dot_product_attention(q, k, v, **kw).astype(
        jnp.float32).sum(), argnums=(0, 1, 2))
  else:
    fn = lambda q, k, v: dot_product_attention(q, k, v, **kw)
  compiled = jax.jit(fn).lower(q, k, v).compile()
  mem = compiled.memory_analysis()
  temp = int(mem.temp_size_in_bytes) if mem is not None else None
  seconds = median_time(compiled, (q, k, v), reps)
  flops = (12 if backward else 4) * heads * length * length * head_dim
  return dict(impl=impl, length=length, pass_="fwd+bwd" if backward else "fwd",
              median_s=seconds, gflops=flops / seconds / 1e9, temp_bytes=temp)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", default="512,1024,2048,4096,8192")
  p.add_argument("--impls", default="reference,chunked,xla" +
                 (",cudnn,pallas" if jax.default_backend() in ("gpu", "tpu") else ""))
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="the device's dense peak for --dtype (H100/H200 SXM bf16: 989): each "
                      "row also as a fraction of it")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--q_block", type=int, default=None)
  p.add_argument("--kv_block", type=int, default=None)
  p.add_argument("--passes", default="fwd,fwd+bwd")
  p.add_argument("--out", default="bench/out/attention.json")
  args = p.parse_args(argv)

  rate = matmul_rate(args.reps, getattr(jnp, args.dtype))
  print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs; jitted f32 matmul: "
        f"{rate:.1f} GFLOP/s")
  rows = []
  header = (f"{'L':>5} {'impl':>9} {'pass':>7} {'median ms':>10} {'GFLOP/s':>8} "
            f"{'x matmul':>8} {'temp MiB':>9}" + (" x peak" if args.peak_tflops else ""))
  print(header)
  print("-" * len(header))
  for length in (int(x) for x in args.lengths.split(",")):
    for backward in [s == "fwd+bwd" for s in args.passes.split(",")]:
      for impl in args.impls.split(","):
        try:
          r = bench_one(impl, length, args.heads, args.head_dim, backward, args.reps,
                        (args.q_block, args.kv_block), getattr(jnp, args.dtype))
        except Exception as e:  # e.g. out of memory at the largest size: report, go on
          print(f"{length:>5} {impl:>9} {'fwd+bwd' if backward else 'fwd':>7}  failed: "
                f"{type(e).__name__}: {str(e)[:80]}")
          continue
        r["matmul_fraction"] = r["gflops"] / rate
        if args.peak_tflops:
          r["peak_fraction"] = r["gflops"] / (1e3 * args.peak_tflops)
        rows.append(r)
        temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        peak = f" {r['peak_fraction']:>6.3f}" if args.peak_tflops else ""
        print(f"{length:>5} {impl:>9} {r['pass_']:>7} {r['median_s'] * 1e3:>10.2f} "
              f"{r['gflops']:>8.1f} {r['matmul_fraction']:>8.2f} {temp:>9}{peak}", flush=True)
  summary = targets(rows)
  for line in summary["lines"]:
    print(line)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(backend=jax.default_backend(), cpus=os.cpu_count(), jax=jax.__version__,
                   heads=args.heads, head_dim=args.head_dim, batch=1, dtype=args.dtype,
                   peak_tflops=args.peak_tflops,
                   matmul_gflops=rate, rows=rows, targets=summary["checks"]), f, indent=1)
  print(f"wrote {args.out}")


def targets(rows, length=4096):
  """The issue's ratio targets at one length, from this run's rows."""
  get = {(r["impl"], r["pass_"]): r for r in rows if r["length"] == length}
  checks, lines = {}, [f"targets at L={length}:"]

  def check(name, value, limit, le=True):
    ok = value <= limit if le else value >= limit
    checks[name] = dict(value=value, limit=limit, ok=ok)
    lines.append(f"  {name}: {value:.3f} ({'<=' if le else '>='} {limit}) "
                 f"{'OK' if ok else 'MISSED'}")

  try:
    cf, rf = get["chunked", "fwd"], get["reference", "fwd"]
    check("chunked/reference temp memory, fwd", cf["temp_bytes"] / rf["temp_bytes"], 0.1)
    cb, rb = get["chunked", "fwd+bwd"], get["reference", "fwd+bwd"]
    check("chunked/reference temp memory, fwd+bwd", cb["temp_bytes"] / rb["temp_bytes"], 0.2)
    check("chunked/reference time, fwd", cf["median_s"] / rf["median_s"], 1.0)
    check("chunked rate / matmul rate, fwd", cf["matmul_fraction"], 0.4, le=False)
  except (KeyError, TypeError, ZeroDivisionError):
    lines.append("  (not all rows present)")
  return dict(checks=checks, lines=lines)


if __name__ == "__main__":
  main()
