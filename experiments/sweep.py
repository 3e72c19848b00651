"""Run the experiment suite over seeds and write its results: table, JSON and Pareto plot.

  python -m experiments.sweep [--runs='*'] [--seeds=3] [--sweep_dir=workdirs/sweep]
      [--data_dir=...] [--tiny] [--publish]

Each run of the suite (below, by name; `--runs` takes names or globs, comma-separated) is
trained for each seed in its own workdir, <sweep_dir>/<name>/seed_<s>. A run whose
workdir holds a summary.json is complete and skipped; an interrupted one resumes from its
last checkpoint (the harness's rule), so rerunning the same command finishes a sweep.
Compression runs start from the dense run of the same seed (their `config.init`) and
distillation uses it as the teacher, so `dense` runs first whenever a selected run needs it.

Then, from the workdirs alone (`--report_only` skips training):
  results.json  every run's figures and each method's mean and std over seeds
  results.md    method | test accuracy (mean ± std) | realized sparsity | bits | bytes on
                disk | compression ratio vs dense fp32 | step-time ratio vs dense
  pareto.png    accuracy against bytes on disk (log scale), one point per method with
                error bars; the Pareto front over methods that see all three modalities
`--publish` copies the three files to experiments/results/ and rewrites README's results
section between its markers: the README table is this command's output.

Bytes on disk are measured: a compression run's export (the harness writes it), or for an
uncompressed run (dense, modality baselines, students) its final weights written raw by
the same writer. The compression ratio is against the dense run's raw fp32 export (4 bytes
a parameter). Step-time ratios come from each run's logged steps/s (median), so unlike
bench/compress_overhead.py they compare different processes: indicative only.
"""
from __future__ import annotations

import fnmatch
import importlib
import json
import os
import shutil
import statistics
import sys
import time

from absl import app, flags

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
}
BASELINES = {"only_text", "only_image", "only_audio", "text+image", "text+audio",
             "image+audio"}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
README = os.path.normpath(os.path.join(RESULTS_DIR, os.pardir, os.pardir, "README.md"))
MARK_BEGIN, MARK_END = "<!-- sweep-results:begin -->", "<!-- sweep-results:end -->"

_RUNS = flags.DEFINE_string("runs", "*", "comma-separated suite names or globs "
                            f"(names: {', '.join(SUITE)})")
_SEEDS = flags.DEFINE_integer("seeds", 3, "seeds per run (0 .. seeds-1), >= 1")
_DIR = flags.DEFINE_string("sweep_dir", "workdirs/sweep", "where the runs' workdirs go")
_DATA = flags.DEFINE_string("data_dir", None, "dataset directory (default: the configs')")
_TINY = flags.DEFINE_bool("tiny", False, "the configs' tiny variants (tests, smoke runs)")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "no training: tabulate what is there")
_PUBLISH = flags.DEFINE_bool("publish", False, "copy results to experiments/results/ and "
                             "rewrite README's results section")


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


def build_config(name: str, seed: int, sweep_dir: str, tiny: bool, data_dir: str | None):
  from experiments.configs.common import DENSE_WORKDIR
  spec = SUITE[name]
  module, _, arg = spec.partition(":")
  arg = ",".join(a for a in (arg, "tiny" if tiny else "") if a)
  config = importlib.import_module(f"experiments.configs.{module[:-3]}").get_config(arg)
  config.seed = seed
  if data_dir:
    config.data.data_dir = data_dir
  dense_dir = run_dir(sweep_dir, "dense", seed)
  if config.get("init") == DENSE_WORKDIR:
    config.init = dense_dir
  distill = config.compress.get("distill")
  if distill and distill.get("teacher") == DENSE_WORKDIR:
    config.compress.distill.teacher = dense_dir
  return config


def run_dir(sweep_dir, name, seed):
  return os.path.join(os.path.abspath(sweep_dir), name, f"seed_{seed}")


def is_complete(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "summary.json"))


def run_all(names, seeds, sweep_dir, tiny, data_dir, log=print, adjust=None):
  """Train every (name, seed) not yet complete; `adjust(config)` edits each config last."""
  from mmjax import train
  todo = [(n, s) for n in names for s in range(seeds)]
  t0 = time.perf_counter()
  for i, (name, seed) in enumerate(todo, 1):
    workdir = run_dir(sweep_dir, name, seed)
    if is_complete(workdir):
      log(f"[sweep {i}/{len(todo)}] {name} seed {seed}: complete, skipped")
      continue
    log(f"[sweep {i}/{len(todo)}] {name} seed {seed} ({SUITE[name]}) -> {workdir} "
        f"[{time.perf_counter() - t0:.0f} s into this sweep]")
    config = build_config(name, seed, sweep_dir, tiny, data_dir)
    if adjust is not None:
      adjust(config)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    train.train_and_evaluate(config, workdir, log=lambda m, p=f"  [{name}/{seed}] ": log(p + m))


# ----------------------------------------------------------------------------- results

def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _median_steps_per_s(workdir):
  rates = []
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if "train/steps_per_s" in r:
          rates.append(r["train/steps_per_s"])
  return statistics.median(rates[1:] or rates) if rates else None  # the first includes compile


def _raw_export_bytes(workdir):
  """Bytes of the run's final weights written raw (fp32) by the export writer."""
  from mmjax import checkpointing
  from mmjax.compress import export
  out = os.path.join(workdir, "export_fp32_raw")
  if not os.path.exists(out):
    reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), read_only=True)
    params = reader.restore_local(reader.latest_step())["params"]
    reader.close()
    export.export(params, out, zstd=False)
  return export.disk_bytes(out)


def run_record(name, seed, workdir) -> dict:
  summary = _read_json(os.path.join(workdir, "summary.json"))
  report = _read_json(os.path.join(workdir, "compression_report.json"))
  rec = dict(name=name, seed=seed, config=SUITE[name], workdir=workdir,
             accuracy=summary.get("eval_accuracy"), parameters=summary.get("parameters"),
             wall_s=summary.get("wall_s"), steps=summary.get("step"),
             steps_per_s=_median_steps_per_s(workdir))
  if report and report.get("disk_bytes"):
    total = report["total"]
    bits = sorted({leaf["bits"] for leaf in report["leaves"]})
    rec.update(disk_bytes=report["disk_bytes"], sparsity=total["sparsity"],
               bits="/".join(map(str, bits)), dense_raw_bytes=report.get("disk_bytes_dense"))
  else:
    rec.update(disk_bytes=_raw_export_bytes(workdir), sparsity=0.0, bits="32")
  return rec


def _mean_std(xs):
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(records: list) -> list:
  by = {}
  for r in records:
    by.setdefault(r["name"], []).append(r)
  dense = by.get("dense", [])
  dense_bytes = _mean_std([r["disk_bytes"] for r in dense])[0]
  dense_rate = _mean_std([r["steps_per_s"] for r in dense])[0]
  rows = []
  for name in SUITE:
    if name not in by:
      continue
    rs = by[name]
    acc, acc_std = _mean_std([r["accuracy"] for r in rs])
    disk = _mean_std([r["disk_bytes"] for r in rs])[0]
    rate = _mean_std([r["steps_per_s"] for r in rs])[0]
    rows.append(dict(
        name=name, config=SUITE[name], seeds=len(rs), accuracy=acc, accuracy_std=acc_std,
        sparsity=_mean_std([r["sparsity"] for r in rs])[0], bits=rs[0]["bits"],
        disk_bytes=disk, ratio=(dense_bytes / disk) if dense_bytes and disk else None,
        step_time_ratio=(dense_rate / rate) if dense_rate and rate else None,
        wall_s=sum(r["wall_s"] or 0 for r in rs), baseline=name in BASELINES))
  return rows


def _fmt(x, f):
  return "–" if x is None else format(x, f)


def table_md(rows, meta: str) -> str:
  lines = [meta, "",
           "| method | config | test accuracy (mean ± std) | sparsity | bits | bytes on disk "
           "| vs dense fp32 | step time vs dense |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['name']} | `{r['config']}` | {100 * r['accuracy']:.2f} ± "
        f"{100 * r['accuracy_std']:.2f}% (n={r['seeds']}) | {_fmt(r['sparsity'], '.3f')} | "
        f"{r['bits']} | {_fmt(r['disk_bytes'], ',.0f')} | {_fmt(r['ratio'], '.2f')}× | "
        f"{_fmt(r['step_time_ratio'], '.2f')}× |")
  return "\n".join(lines) + "\n"


def pareto_front(points):
  """Indices of points no other point beats on both axes (fewer bytes, higher accuracy)."""
  front = []
  for i, (b, a) in enumerate(points):
    if not any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for b2, a2 in points):
      front.append(i)
  return sorted(front, key=lambda i: points[i][0])


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  main = [r for r in rows if not r["baseline"] and r["disk_bytes"]]
  for r in rows:
    if not r["disk_bytes"]:
      continue
    style = dict(color="0.6", marker="x") if r["baseline"] else dict(marker="o")
    ax.errorbar(r["disk_bytes"], 100 * r["accuracy"], yerr=100 * r["accuracy_std"],
                capsize=3, linestyle="none", **style)
    ax.annotate(r["name"], (r["disk_bytes"], 100 * r["accuracy"]), fontsize=7,
                xytext=(4, 3), textcoords="offset points")
  pts = [(r["disk_bytes"], r["accuracy"]) for r in main]
  front = pareto_front(pts)
  if front:
    ax.step([pts[i][0] for i in front], [100 * pts[i][1] for i in front], where="post",
            color="C3", alpha=0.6, label="Pareto front")
    ax.legend(loc="lower right")
  ax.set_xscale("log")
  ax.set_xlabel("bytes on disk (log scale)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("mm_arith/procedural: accuracy against size (mean ± std over seeds)")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(names, seeds, sweep_dir, log=print) -> dict:
  records = []
  for name in names:
    for seed in range(seeds):
      workdir = run_dir(sweep_dir, name, seed)
      if is_complete(workdir):
        records.append(run_record(name, seed, workdir))
      else:
        log(f"[sweep] {name} seed {seed}: not complete, left out of the results")
  if not records:
    raise ValueError(f"no complete run under {sweep_dir}: run the sweep first.")
  rows = aggregate(records)
  total = sum(r["wall_s"] or 0 for r in records)
  meta = (f"{len(records)} runs ({', '.join(sorted({str(r['seed']) for r in records}))} "
          f"seeds), {total / 3600:.2f} h of training wall time in total, sweep dir "
          f"`{sweep_dir}`.")
  out = dict(meta=meta, methods=rows, runs=records)
  os.makedirs(sweep_dir, exist_ok=True)
  with open(os.path.join(sweep_dir, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(sweep_dir, "results.md"), "w") as f:
    f.write(table_md(rows, meta))
  plot(rows, os.path.join(sweep_dir, "pareto.png"))
  log(table_md(rows, meta))
  log(f"[sweep] wrote results.md, results.json, pareto.png in {sweep_dir}")
  return out


def publish(sweep_dir, readme=README, results_dir=RESULTS_DIR, log=print):
  """Copy the results into the repository and rewrite README's section between markers."""
  os.makedirs(results_dir, exist_ok=True)
  for f in ("results.md", "results.json", "pareto.png"):
    shutil.copy(os.path.join(sweep_dir, f), os.path.join(results_dir, f))
  with open(readme) as f:
    text = f.read()
  if MARK_BEGIN not in text or MARK_END not in text:
    raise ValueError(f"{readme} has no {MARK_BEGIN} ... {MARK_END} section to rewrite.")
  with open(os.path.join(results_dir, "results.md")) as f:
    table = f.read()
  rel = os.path.relpath(os.path.join(results_dir, "pareto.png"), os.path.dirname(readme))
  head, rest = text.split(MARK_BEGIN, 1)
  _, tail = rest.split(MARK_END, 1)
  body = f"{MARK_BEGIN}\n{table}\n![accuracy against bytes on disk]({rel})\n{MARK_END}"
  with open(readme, "w") as f:
    f.write(head + body + tail)
  log(f"[sweep] README results section rewritten from {results_dir}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SEEDS.value < 1:
    raise app.UsageError(f"--seeds={_SEEDS.value} must be >= 1.")
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  try:
    names = select(_RUNS.value)
    if not _REPORT_ONLY.value:
      run_all(names, _SEEDS.value, _DIR.value, _TINY.value, _DATA.value)
    report(names, _SEEDS.value, _DIR.value)
    if _PUBLISH.value:
      publish(_DIR.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
