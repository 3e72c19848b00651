"""Quickstart: the whole story on the embedded dataset, from a fresh clone, on a laptop CPU.

  ./launch.sh quickstart [--workdir=workdirs/quickstart] [--data_dir=...] [--tiny]

1. prepares the offline dataset mm_arith/procedural if it is missing (no download);
2. trains the dense `small` multimodal model (text + image + audio, cross-attention fusion)
   with the quickstart recipe (QUICK below: 1,800 steps at lr 2.5e-4 instead of dense.py's
   3,000 at 5e-4; measured 92.4% in 478 s on 2 cores; then 800 compression steps: 89.3%,
   19x smaller on disk; 12.4 min in all, 12 min 52 s from a fresh clone with setup, README);
3. compresses it with the combined pipeline (self-distillation from the dense model +
   gradual magnitude pruning to 90% of the block kernels + int8 QAT of every parameter)
   and exports the real int8 / bit-packed checkpoint;
4. prints the compression report and a dense-vs-compressed table (accuracy, bytes on disk,
   train step time) and writes pareto.png with the two points.

Progress is printed all along; everything goes under --workdir, and a rerun reuses every
finished stage (an interrupted stage resumes from its last checkpoint).
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/quickstart", "where everything goes")
_DATA = flags.DEFINE_string("data_dir", None, "dataset directory (default: <workdir>/data)")
_TINY = flags.DEFINE_bool("tiny", False, "the tiny model and a few steps (a smoke test)")
_PUBLISH = flags.DEFINE_bool("publish", False, "rewrite README's quickstart figures (between "
                             "its quickstart-results markers) with this run's")
MARK_BEGIN, MARK_END = "<!-- quickstart-results:begin -->", "<!-- quickstart-results:end -->"

# The quickstart recipe for `small` (measured, README). Peak learning rates tried on
# 2,500-3,000-step cosine schedules, batch 64: 3e-3 and 2e-3 still at chance at step 1,000;
# 1e-3 30% at 1,000; 5e-4 45% at 1,000 and 98.6% at 2,000; 2.5e-4 51% at 1,000 and 95.9%
# at 1,500. Batch 32 at 2e-3: 21% after 2,500 steps.
# Compression: 500 steps (ramp to 90% by 350) kept 52% of 92%; 800 (ramp by 550) 88.6%.
QUICK = dict(dense_steps=1800, dense_lr=2.5e-4, dense_warmup=100, compress_steps=800,
             prune_end=550, prune_every=25)


def _stage(name, config, workdir, log):
  """Run one stage (or reuse it); -> its wall time in s (None if reused)."""
  from mmjax.harness import train
  if os.path.exists(os.path.join(workdir, "summary.json")):
    log(f"[quickstart] {name}: already done in {workdir}, reused")
    return None
  log(f"[quickstart] {name}: {config.train.steps} steps -> {workdir}")
  t0 = time.perf_counter()
  train.train_and_evaluate(config, workdir, log=lambda m: log(f"  [{name}] {m}"))
  return time.perf_counter() - t0


def figures(recs, times, d, c) -> str:
  """The paragraph README quotes, from this run's records (what --publish writes)."""
  dense, comp = recs
  total = sum(times.values())
  ms = lambda r: 1e3 / r["steps_per_s"]
  return (
      f"Measured {time.strftime('%Y-%m-%d')} on a {os.cpu_count()}-core CPU by "
      f"`./launch.sh quickstart --publish` (environment already set up; a fresh setup adds "
      f"about a minute): **{int(total // 60)} min {int(total % 60)} s** in all, the dense "
      f"stage (dataset preparation included) {times['dense']:.0f} s and the compressed "
      f"{times['compressed']:.0f} s. Dense {d.train.steps:,} steps (lr {d.optimizer.lr:g}) "
      f"**{100 * dense['accuracy']:.2f}%** test accuracy; combined {c.train.steps:,} steps "
      f"(pruning ramp to 90% by step {c.compress.prune.ramp.end}) "
      f"**{100 * comp['accuracy']:.2f}%** ({comp['accuracy'] / dense['accuracy']:.1%} of "
      f"dense), export {comp['disk_bytes']:,} bytes on disk, **"
      f"{dense['disk_bytes'] / comp['disk_bytes']:.1f}× smaller** than the dense raw fp32 "
      f"({dense['disk_bytes']:,} bytes); train step {ms(dense):.0f} ms dense, "
      f"{ms(comp):.0f} ms compressed ({ms(comp) / ms(dense):.2f}×).")


def configs(workdir, data_dir, tiny):
  from experiments.configs import combined, dense
  d = dense.get_config("tiny" if tiny else "")
  c = combined.get_config("tiny" if tiny else "")
  for cfg in (d, c):
    cfg.data.data_dir = data_dir
  c.init = os.path.join(workdir, "dense")
  if not tiny:
    d.train.steps, d.optimizer.lr = QUICK["dense_steps"], QUICK["dense_lr"]
    d.optimizer.warmup_steps = QUICK["dense_warmup"]
    d.train.eval_every = d.train.checkpoint_every = 500
    c.train.steps = c.train.eval_every = c.train.checkpoint_every = QUICK["compress_steps"]
    c.compress.prune.ramp.end = QUICK["prune_end"]
    c.compress.prune.ramp.every = QUICK["prune_every"]
  return d, c


def summarize(workdir, log=print):
  """Comparison table and pareto.png from the two finished stages."""
  from experiments import results
  from mmjax.compress import report as report_lib
  rep = json.load(open(os.path.join(workdir, "compressed", "compression_report.json")))
  log(report_lib.format_table(rep))
  recs = [results.run_record("dense", 0, os.path.join(workdir, "dense"), "dense.py"),
          results.run_record("combined", 0, os.path.join(workdir, "compressed"), "combined.py")]
  rows = results.aggregate(recs)
  dense, comp = recs
  log("\n[quickstart] dense vs compressed")
  log(f"{'':28s} {'test accuracy':>14s} {'bytes on disk':>14s} {'train step':>11s}")
  for name, r in (("dense fp32", dense), ("compressed (combined)", comp)):
    ms = 1e3 / r["steps_per_s"] if r["steps_per_s"] else float("nan")
    log(f"{name:28s} {100 * r['accuracy']:13.2f}% {r['disk_bytes']:14,d} {ms:9.0f} ms")
  log(f"{'compressed / dense':28s} {comp['accuracy'] / dense['accuracy']:13.3f}x "
      f"{comp['disk_bytes'] / dense['disk_bytes']:13.4f}x "
      f"{dense['steps_per_s'] / comp['steps_per_s']:10.2f}x")
  log(f"  ({dense['disk_bytes'] / comp['disk_bytes']:.1f}x smaller on disk; the compressed "
      "step also runs the teacher's forward, prunes and fake-quantizes)")
  results.plot(rows, os.path.join(workdir, "pareto.png"))
  return recs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  t0 = time.perf_counter()
  workdir = os.path.abspath(_WORKDIR.value)
  data_dir = os.path.abspath(_DATA.value or os.path.join(workdir, "data"))
  log = lambda m: print(m, flush=True)
  d, c = configs(workdir, data_dir, _TINY.value)
  log(f"[quickstart] dense `{'tiny' if _TINY.value else 'small'}` model, then the combined "
      f"compression pipeline; everything under {workdir}")
  try:
    times = {"dense": _stage("dense", d, os.path.join(workdir, "dense"), log),
             "compressed": _stage("compressed", c, os.path.join(workdir, "compressed"), log)}
    recs = summarize(workdir, log)
    if _PUBLISH.value:
      if None in times.values() or _TINY.value:
        raise ValueError("--publish needs a fresh, full-size run (a new --workdir, no --tiny) "
                         "so that its times are measured.")
      from experiments import results
      text = figures(recs, times, d, c)
      with open(os.path.join(workdir, "quickstart.md"), "w") as f:
        f.write(text + "\n")
      results.rewrite_section(results.README, MARK_BEGIN, MARK_END, text)
      log(f"[quickstart] README quickstart figures rewritten:\n{text}")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  log(f"\n[quickstart] done in {time.perf_counter() - t0:.0f} s. Written:\n"
      f"  {workdir}/dense                 dense run (checkpoints, metrics.jsonl, config.json)\n"
      f"  {workdir}/compressed            compressed run, compression_report.json\n"
      f"  {workdir}/compressed/export     the int8 / bit-packed checkpoint (load with "
      "mmjax.compress.export.load)\n"
      f"  {workdir}/pareto.png            accuracy against bytes on disk\n"
      f"  {data_dir}  the dataset")


if __name__ == "__main__":
  app.run(main)
