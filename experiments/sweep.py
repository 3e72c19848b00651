"""Run the experiment suite over seeds and write its results: table, JSON and Pareto plot.

  python -m experiments.sweep [--runs='*'] [--seeds=3] [--sweep_dir=workdirs/sweep]
      [--data_dir=...] [--tiny] [--report_only] [--publish] [--compile_cache=...]

Each run of the suite (below, by name; `--runs` takes names or globs, comma-separated) is
trained for each seed in its own workdir, <sweep_dir>/<name>/seed_<s>, seed by seed (the
whole suite for seed 0 first, so a one-seed table exists early). A run whose
workdir holds a summary.json is complete and skipped; an interrupted one resumes from its
last checkpoint (the harness's rule), so rerunning the same command finishes a sweep.
Compression runs start from the dense run of the same seed (their `config.init`) and
distillation uses it as the teacher, so `dense` runs first whenever a selected run needs it.

Then, from the workdirs alone (`--report_only` skips training):
  results.json  every run's figures and each method's mean and std over seeds
  results.md    method | test accuracy (mean ± std) | realized sparsity | bits | bytes on
                disk | compression ratio vs dense fp32 | step-time ratio vs dense; then
                the suite's targets with their measured values (experiments/targets.py)
  pareto.png    accuracy against bytes on disk (log scale), one point per method with
                error bars; the Pareto front over methods that see all three modalities
  pareto_flops.png  accuracy against one forward's FLOPs (runs measure it: each run's
                config.train.measure_forward = 64, compressed and dense side by side)
`--publish` copies the three files to experiments/results/ and rewrites docs/results/suite.md's
section between its markers: the table there is this command's output.

Bytes on disk are measured: a compression run's export (the harness writes it), or for an
uncompressed run (dense, modality baselines, students) its final weights written raw by
the same writer. The compression ratio is against the dense run's raw fp32 export (4 bytes
a parameter). Step-time ratios come from each run's logged steps/s (median), so unlike
bench/compress_overhead.py they compare different processes: indicative only.

`--section=post_training` runs the one-shot suite of experiments/post_training_suite.py
instead, dense seed by dense seed (each dense run, then its rows). `--pt_carry=<an earlier
publish's post_training_<tag>.json>` counts the runs recorded there as done and reports them
with this sweep's, so the suite, longer than one machine's life here, accumulates in the
published file; `--pt_seeds=1,2` limits one invocation to some dense seeds.
"""
from __future__ import annotations

import fnmatch
import importlib
import json
import os
import sys
import time
import traceback

from absl import app, flags

from experiments.results import is_complete, run_dir  # noqa: F401 (the sweep's layout)

# name -> config file[:args]; order is run order (dense first: the others start from it)
SUITE = {
    "dense": "dense.py",
    "only_text": "modalities.py:use=text",
    "only_image": "modalities.py:use=image",
    "only_audio": "modalities.py:use=audio",
    "text+image": "modalities.py:use=text+image",
    "text+audio": "modalities.py:use=text+audio",
    "image+audio": "modalities.py:use=image+audio",
    "prune50": "prune.py:sparsity=0.5",
    "prune75": "prune.py:sparsity=0.75",
    "prune90": "prune.py:sparsity=0.9",
    "prune95": "prune.py:sparsity=0.95",
    "prune90_oneshot": "prune.py:sparsity=0.9,oneshot",
    "nm24": "nm.py",
    "qat_int8": "qat.py",
    "ptq_int8": "ptq.py",
    "distill_student": "distill.py",
    "scratch_student": "distill.py:scratch",
    "combined": "combined.py",
    # protocol v2 (issue 30): learned step sizes against min-max scales at the same bits,
    # and trained low-rank factors
    "qat_w4": "qat.py:bits=4",
    "qat_w4_lsq": "qat.py:bits=4,lsq",
    "qat_w2": "qat.py:bits=2",
    "qat_w2_lsq": "qat.py:bits=2,lsq",
    "lowrank16": "lowrank.py:rank=16",
    # multimodal-only compression (issue 31): token merging in the image and audio towers
    # (off the shelf, and fine-tuned; r = 6 is the most these towers allow), cross-modal
    # token pruning after fusion layer 0 or after tower block 0 (without and with a
    # fine-tune), and the student distilled with fusion attention maps
    "tome_r4": "tome.py:r=4,steps=0",
    "tome_r4_ft": "tome.py:r=4",
    "tome_r6": "tome.py:r=6,steps=0",
    "tome_r6_ft": "tome.py:r=6",
    "xprune30": "xprune.py:keep=0.3,steps=0",
    "xprune30_ft": "xprune.py:keep=0.3",
    "xprune30_b0": "xprune.py:keep=0.3,block=0,steps=0",
    "xprune30_b0_ft": "xprune.py:keep=0.3,block=0",
    "distill_att": "distill.py:attention=1",
    "distill_att_only": "distill.py:attention=1,alpha=0",
}
BASELINES = {"only_text", "only_image", "only_audio", "text+image", "text+audio",
             "image+audio"}

_RUNS = flags.DEFINE_string("runs", "*", "comma-separated suite names or globs "
                            f"(names: {', '.join(SUITE)})")
_SEEDS = flags.DEFINE_integer("seeds", 3, "seeds per run (0 .. seeds-1), >= 1")
_DIR = flags.DEFINE_string("sweep_dir", "workdirs/sweep", "where the runs' workdirs go")
_DATA = flags.DEFINE_string("data_dir", None, "dataset directory (default: the configs')")
_DATASET = flags.DEFINE_string("dataset", None, "every run's config.data.dataset (default: "
                               "the configs', mm_arith/procedural); e.g. mm_arith/real, in a "
                               "sweep_dir of its own")
_SECTION = flags.DEFINE_enum("section", "trained", ["trained", "post_training"],
                             "trained: the suite above; post_training: the one-shot suite of "
                             "experiments/post_training_suite.py on the dense runs")
_CALIB_SEEDS = flags.DEFINE_integer("calib_seeds", 2, "post_training: calibration seeds per "
                                    "dense seed, for the methods that read calibration data")
_PT_ROWS = flags.DEFINE_string("pt_rows", "*", "post_training: rows (names or globs)")
_PT_CARRY = flags.DEFINE_string("pt_carry", "", "post_training: an earlier publish's "
                                "post_training_<tag>.json; its runs count as done and are "
                                "reported with this sweep's (a suite longer than one machine's "
                                "life accumulates in the published file)")
_PT_SEEDS = flags.DEFINE_string("pt_seeds", "", "post_training: comma-separated dense seeds to "
                                "work on in this invocation (default: all pending); the report "
                                "still covers seeds 0 .. seeds-1")
_TRAINED = flags.DEFINE_string("trained_results", "experiments/results/results.json",
                               "post_training: the trained suite's results, drawn in its plot")
_TINY = flags.DEFINE_bool("tiny", False, "the configs' tiny variants (tests, smoke runs)")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "no training: tabulate what is there")
_CACHE = flags.DEFINE_string("compile_cache", "<sweep_dir>/jax_cache",
                             "persistent XLA compilation cache: the seeds of one run compile "
                             "the same programs, so only the first pays ('' disables)")
_CARRY = flags.DEFINE_string("carry", "", "an earlier publish's results.json: its runs count as "
                             "done and are reported with this sweep's (runs trained here "
                             "take precedence), so rows added later join the published table "
                             "without retraining the suite")
_PUBLISH = flags.DEFINE_bool("publish", False, "copy results to experiments/results/ and "
                             "rewrite docs/results/suite.md's results section")


def select(patterns: str) -> list:
  """Suite names matching the comma-separated names/globs, in suite order; dense added
  first when a selected run starts from it. Unknown patterns are an error."""
  chosen = set()
  for pat in [p.strip() for p in patterns.split(",") if p.strip()]:
    hits = [n for n in SUITE if fnmatch.fnmatchcase(n, pat)]
    if not hits:
      raise ValueError(f"--runs: {pat!r} matches no run of the suite; names: "
                       f"{', '.join(SUITE)}.")
    chosen.update(hits)
  if not chosen:
    raise ValueError("--runs selects nothing; give names or globs, e.g. --runs='prune*'.")
  if chosen - {"dense"} - BASELINES - {"scratch_student"}:
    chosen.add("dense")
  return [n for n in SUITE if n in chosen]


def build_config(name: str, seed: int, sweep_dir: str, tiny: bool, data_dir: str | None,
                 dataset: str | None = None):
  from experiments.configs.common import DENSE_WORKDIR
  spec = SUITE[name]
  module, _, arg = spec.partition(":")
  arg = ",".join(a for a in (arg, "tiny" if tiny else "") if a)
  config = importlib.import_module(f"experiments.configs.{module[:-3]}").get_config(arg)
  config.seed = seed
  if data_dir:
    config.data.data_dir = data_dir
  if dataset:
    config.data.dataset = dataset
  dense_dir = run_dir(sweep_dir, "dense", seed)
  if config.get("init") == DENSE_WORKDIR:
    config.init = dense_dir
  distill = config.compress.get("distill")
  if distill and distill.get("teacher") == DENSE_WORKDIR:
    config.compress.distill.teacher = dense_dir
  config.train.measure_forward = 64  # FLOPs and throughput of one forward, vs dense
  return config


def add_cost(name, seed, workdir, sweep_dir, tiny, data_dir, dataset, adjust, log):
  """A complete run that finished before runs measured their forward's cost gets it now,
  from its config on fresh weights (`forward_cost.measure_config`), in its summary.json."""
  from mmjax.harness import forward_cost
  path = os.path.join(workdir, "summary.json")
  with open(path) as f:
    summary = json.load(f)
  if "cost_forward_flops" in summary:
    return
  config = build_config(name, seed, sweep_dir, tiny, data_dir, dataset)
  if adjust is not None:
    adjust(config)
  batch = int(config.train.get("measure_forward") or 0)
  if batch <= 0:
    return
  try:
    cost = forward_cost.measure_config(config, batch)
  except ValueError as e:  # a config older code wrote that no longer validates
    log(f"  [{name}/{seed}] forward cost not measured: {e}")
    return
  summary.update({f"cost_{k}": v for k, v in cost.items()}, cost_measured_after=True)
  with open(path, "w") as f:
    json.dump(summary, f, indent=1)
  log(f"  [{name}/{seed}] forward cost measured now: {cost['forward_flops'] / 1e6:.2f} MFLOPs "
      "an example")


def enable_compile_cache(path: str):
  """Reuse compiled executables across runs and sweeps. Cached executables are the ones
  a fresh compile would produce, so numbers do not change; only compile time does."""
  if not path:
    return
  import jax
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_all(names, seeds, sweep_dir, tiny, data_dir, log=print, adjust=None, dataset=None):
  """Train every (name, seed) not yet complete (`seeds`: a count, or the seeds themselves);
  `adjust(config)` edits each config last. A run that fails is logged and the sweep goes
  on (a background sweep does not lose the night to one bad row); -> [(name, seed, why)]
  of the failed runs."""
  from mmjax.harness import train
  # seed-major: a complete one-seed table exists after the first pass over the suite
  seeds = range(seeds) if isinstance(seeds, int) else seeds
  todo = [(n, s) for s in seeds for n in names]
  t0 = time.perf_counter()
  failed = []
  for i, (name, seed) in enumerate(todo, 1):
    workdir = run_dir(sweep_dir, name, seed)
    if is_complete(workdir):
      log(f"[sweep {i}/{len(todo)}] {name} seed {seed}: complete, skipped")
      add_cost(name, seed, workdir, sweep_dir, tiny, data_dir, dataset, adjust, log)
      continue
    log(f"[sweep {i}/{len(todo)}] {name} seed {seed} ({SUITE[name]}) -> {workdir} "
        f"[{time.perf_counter() - t0:.0f} s into this sweep]")
    try:
      config = build_config(name, seed, sweep_dir, tiny, data_dir, dataset)
      if adjust is not None:
        adjust(config)
      os.makedirs(os.path.dirname(workdir), exist_ok=True)
      train.train_and_evaluate(config, workdir,
                               log=lambda m, p=f"  [{name}/{seed}] ": log(p + m))
    except Exception as e:  # noqa: BLE001 (any run's failure; the rest still run)
      why = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
      if not isinstance(e, ValueError):  # not one of mmjax's one-line errors: the trace
        log(traceback.format_exc())
      log(f"[sweep {i}/{len(todo)}] {name} seed {seed}: FAILED: {why}")
      failed.append((name, seed, why))
  return failed


def load_carry(path) -> list:
  """The run records of an earlier publish's results.json (`runs`), [] for ''."""
  if not path:
    return []
  if not os.path.exists(path):
    raise ValueError(f"--carry={path}: no such file; give an earlier publish's results.json "
                     "(experiments/results/results.json), or '' to carry nothing.")
  with open(path) as f:
    try:
      runs = json.load(f).get("runs")
    except (json.JSONDecodeError, AttributeError):
      runs = None
  if not isinstance(runs, list) or not all(isinstance(r, dict) and "name" in r and "seed" in r
                                           for r in runs):
    raise ValueError(f"--carry={path}: not a results file of this sweep (no 'runs' list of "
                     "records); give experiments/results/results.json.")
  unknown = sorted({r["name"] for r in runs} - set(SUITE))
  if unknown:
    raise ValueError(f"--carry={path}: runs {unknown} are not runs of the suite.")
  return runs


def report(names, seeds, sweep_dir, log=print, carried=()) -> dict:
  """results.json, results.md and pareto.png in `sweep_dir` from the complete runs, and the
  `carried` records (an earlier publish's) of runs not complete here."""
  from experiments import results, targets
  # a run's step time compares with the dense runs timed alongside it (its `origin`: the
  # date of the sweep that timed it; an earlier publish's runs ran on another machine)
  here = "sweep of " + time.strftime("%Y-%m-%d")
  carried = [{**r, "origin": r.get("origin") or "an earlier publish"} for r in carried]
  old = {(r["name"], int(r["seed"])): r for r in carried}
  names = [n for n in SUITE if n in set(names) | {n for n, _ in old}]
  records, notes, n_old = [], [], 0
  for name in names:
    for seed in range(seeds):
      workdir = run_dir(sweep_dir, name, seed)
      if is_complete(workdir):
        rec = {**results.run_record(name, seed, workdir, SUITE[name]), "origin": here}
        there = old.get((name, seed))
        if name == "dense" and there and there["accuracy"] != rec["accuracy"]:
          notes.append(f"dense seed {seed} was retrained here ({rec['accuracy']:.2%}; the "
                       f"carried runs of seed {seed} started from {there['accuracy']:.2%})")
        records.append(rec)
      elif (name, seed) in old:
        records.append(old[(name, seed)])
        n_old += 1
      else:
        log(f"[sweep] {name} seed {seed}: not complete, left out of the results")
  if not records:
    raise ValueError(f"no complete run under {sweep_dir}: run the sweep first.")
  # step times compare with the dense runs timed alongside: carried runs with the carried
  # dense runs (another machine), even where dense was retrained here
  dense_times = results.dense_step_times(
      [r for r in records + carried if r["name"] == "dense"])
  rows = results.aggregate(records, BASELINES, dense_times)
  total = sum(r["wall_s"] or 0 for r in records)
  seeds_seen = ", ".join(sorted({str(r["seed"]) for r in records}))
  datasets = sorted({r["dataset"] for r in records if r.get("dataset")})
  meta = (f"{len(records)} runs" + (f" on {', '.join(datasets)}" if datasets else "")
          + f" (seeds {seeds_seen}), {total / 3600:.2f} h of training wall "
          f"time in total, sweep dir `{sweep_dir}`"
          + (f"; {n_old} runs carried from an earlier publish" if n_old else "")
          + "".join(f"; {n}" for n in notes) + ".")
  # the targets are set for the suite's dataset: on another one (mm_arith/real's ceiling is
  # lower) a verdict such as "dense >= 95%: missed" would mislead
  other = sorted({r.get("dataset") for r in records} - {None, targets.DATASET})
  checks = [] if other else targets.check(rows)
  out = dict(meta=meta, methods=rows, targets=[dict(target=t, measured=m, met=v)
                                               for t, m, v in checks], runs=records)
  os.makedirs(sweep_dir, exist_ok=True)
  with open(os.path.join(sweep_dir, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  md = results.table_md(rows, meta) + (
      f"\nThe suite's targets are set for {targets.DATASET}; none is checked on "
      f"{', '.join(other)}.\n" if other else "\nTargets:\n\n" + targets.table_md(checks))
  with open(os.path.join(sweep_dir, "results.md"), "w") as f:
    f.write(md)
  title = f"{', '.join(datasets) or targets.DATASET}, small model"
  results.plot(rows, os.path.join(sweep_dir, "pareto.png"), title)
  results.plot_flops(rows, os.path.join(sweep_dir, "pareto_flops.png"), title)
  log(md)
  log(f"[sweep] wrote results.md, results.json, pareto.png (and pareto_flops.png) in "
      f"{sweep_dir}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SEEDS.value < 1:
    raise app.UsageError(f"--seeds={_SEEDS.value} must be >= 1.")
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  try:
    if _SECTION.value == "post_training":
      return post_training_main()
    names = select(_RUNS.value)
    carried = load_carry(_CARRY.value)
    failed = []
    if not _REPORT_ONLY.value:
      enable_compile_cache(_CACHE.value.replace("<sweep_dir>", _DIR.value))
      failed = run_all(names, _SEEDS.value, _DIR.value, _TINY.value, _DATA.value,
                       dataset=_DATASET.value)
    report(names, _SEEDS.value, _DIR.value, carried=carried)
    if failed:
      raise ValueError(f"{len(failed)} run(s) failed: " + "; ".join(
          f"{n} seed {s} ({why.splitlines()[0][:150]})" for n, s, why in failed)
          + ". Fix them and rerun the same command (complete runs are skipped).")
    if _PUBLISH.value:
      from experiments import results
      results.publish(_DIR.value, dataset=_DATASET.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def post_training_main():
  from experiments import post_training_report as ptr
  from experiments import post_training_suite as pts
  if _CALIB_SEEDS.value < 1:
    raise app.UsageError(f"--calib_seeds={_CALIB_SEEDS.value} must be >= 1.")
  rows = pts.select(_PT_ROWS.value)
  carried = pts.load_carried(_PT_CARRY.value)
  try:
    only = sorted({int(s) for s in _PT_SEEDS.value.split(",") if s.strip()})
  except ValueError:
    raise ValueError(f"--pt_seeds={_PT_SEEDS.value!r}: give dense seeds as integers, e.g. "
                     "--pt_seeds=1,2.") from None
  if any(not 0 <= s < _SEEDS.value for s in only):
    raise ValueError(f"--pt_seeds={_PT_SEEDS.value!r}: seeds must lie in 0 .. "
                     f"{_SEEDS.value - 1} (--seeds={_SEEDS.value}).")
  carried = pts.consistent_carried(carried, _SEEDS.value, _DIR.value)
  if not _REPORT_ONLY.value:
    enable_compile_cache(_CACHE.value.replace("<sweep_dir>", _DIR.value))
    pending = [s for s in pts.pending_seeds(rows, _SEEDS.value, _CALIB_SEEDS.value, _DIR.value,
                                            carried) if not only or s in only]
    # dense seed by seed, each followed by its rows: a seed's rows exist before the next
    # dense run starts, so an interrupted session still leaves whole seeds behind
    for s in pending:
      failed = run_all(["dense"], [s], _DIR.value, _TINY.value, _DATA.value,
                       dataset=_DATASET.value)
      if failed:  # the rows start from it
        raise ValueError(f"dense seed {s} failed: {failed[0][2].splitlines()[0][:200]}")
      carried = pts.consistent_carried(carried, _SEEDS.value, _DIR.value)
      pts.run_all(rows, _SEEDS.value, _CALIB_SEEDS.value, _DIR.value, _TINY.value,
                  _DATA.value, _DATASET.value, carried=carried, only_seeds={s})
  ptr.report(rows, _SEEDS.value, _CALIB_SEEDS.value, _DIR.value, _DATASET.value,
             _TRAINED.value, carried=carried, carried_from=_PT_CARRY.value or None)
  if _PUBLISH.value:
    ptr.publish(_DIR.value, _DATASET.value or "mm_arith/procedural")


if __name__ == "__main__":
  app.run(main)
