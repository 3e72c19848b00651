"""Results of finished runs: per-run figures, per-method mean and std over seeds, the
markdown table, the Pareto plot, and README publishing. Reads workdirs without changing
them (summary.json, compression_report.json, metrics.jsonl, checkpoints), so it works on
any set of runs: the sweep's, or the quickstart's two.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO = os.path.normpath(os.path.join(RESULTS_DIR, os.pardir, os.pardir))
README = os.path.join(REPO, "README.md")  # the quickstart's figures
RESULTS_DOC = os.path.join(REPO, "docs", "results", "suite.md")  # the sweep's table and plot
POST_TRAINING_DOC = os.path.join(REPO, "docs", "results", "post_training.md")  # the one-shot suite
MARK_BEGIN, MARK_END = "<!-- sweep-results:begin -->", "<!-- sweep-results:end -->"


def run_dir(sweep_dir, name, seed):
  """A sweep run's workdir: <sweep_dir>/<name>/seed_<seed>."""
  return os.path.join(os.path.abspath(sweep_dir), name, f"seed_{seed}")


def is_complete(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "summary.json"))


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
  """Bytes of the run's final weights written raw (fp32) by the export writer, measured in
  a temporary directory (the workdir is left as it was)."""
  import tempfile

  from mmjax.compress import export
  from mmjax.harness import checkpointing
  reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), read_only=True)
  params = reader.restore_local(reader.latest_step())["params"]
  reader.close()
  with tempfile.TemporaryDirectory() as tmp:
    export.export(params, os.path.join(tmp, "raw"), zstd=False)
    return export.disk_bytes(os.path.join(tmp, "raw"))


def run_record(name, seed, workdir, config="") -> dict:
  """One finished run's figures. Bytes on disk: the compression run's measured export, or
  for an uncompressed run its weights written raw (None if a compression run exported
  nothing)."""
  summary = _read_json(os.path.join(workdir, "summary.json"))
  report = _read_json(os.path.join(workdir, "compression_report.json"))
  config_json = _read_json(os.path.join(workdir, "config.json")) or {}
  dataset = (config_json.get("data") or {}).get("dataset")
  rec = dict(name=name, seed=seed, config=config, workdir=workdir, dataset=dataset,
             accuracy=summary.get("eval_accuracy"), loss=summary.get("eval_loss"),
             parameters=summary.get("parameters"),
             wall_s=summary.get("wall_s"), steps=summary.get("step"),
             steps_per_s=_median_steps_per_s(workdir),
             # one forward of a batch of 64, compressed and dense (config.train.measure_forward)
             flops=summary.get("cost_forward_flops"),
             dense_flops=summary.get("cost_dense_forward_flops"),
             forward_ms=summary.get("cost_forward_ms"),
             dense_forward_ms=summary.get("cost_dense_forward_ms"))
  if report:
    bits = sorted({leaf["bits"] for leaf in report["leaves"]})
    rec.update(disk_bytes=report.get("disk_bytes"), sparsity=report["total"]["sparsity"],
               bits="/".join(map(str, bits)), dense_raw_bytes=report.get("disk_bytes_dense"))
  else:
    rec.update(disk_bytes=_raw_export_bytes(workdir), sparsity=0.0, bits="32")
  return rec


def _mean_std(xs):
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def dense_step_times(dense: list) -> dict:
  """{origin: mean seconds per step of the dense runs timed there}."""
  times = {}
  for r in dense:
    if r["steps_per_s"]:
      times.setdefault(r.get("origin", ""), []).append(1.0 / r["steps_per_s"])
  return {o: sum(t) / len(t) for o, t in times.items()}


def _same_model(r, dense_flops) -> bool:
  """Whether a run's own dense forward is the dense model's (its FLOPs equal)."""
  return bool(r.get("dense_flops") and dense_flops
              and abs(r["dense_flops"] - dense_flops) <= 1e-6 * dense_flops)


def aggregate(records: list, baselines=(), dense_times: dict | None = None) -> list:
  """One row per method (in the records' order), mean and std over its seeds; ratios
  against the `dense` method's mean. A run's step time is compared with the dense runs of
  its own `origin` (runs carried from an earlier publish were timed on another machine):
  `dense_times` {origin: dense seconds per step}, by default from the dense records."""
  by = {}
  for r in records:
    by.setdefault(r["name"], []).append(r)
  dense = by.get("dense", [])
  dense_bytes = _mean_std([r["disk_bytes"] for r in dense])[0]
  dense_flops = _mean_std([r.get("flops") for r in dense])[0]
  dense_ms = _mean_std([r.get("forward_ms") for r in dense])[0]
  if dense_times is None:
    dense_times = dense_step_times(dense)
  rows = []
  for name, rs in by.items():
    acc, acc_std = _mean_std([r["accuracy"] for r in rs])
    disk = _mean_std([r["disk_bytes"] for r in rs])[0]
    ratios = [1.0 / r["steps_per_s"] / dense_times[r.get("origin", "")] for r in rs
              if r["steps_per_s"] and dense_times.get(r.get("origin", ""))]
    # FLOPs against the dense runs' (exact across processes). Throughput against the dense
    # forward timed beside the run's own (same process) when that is the dense model; for
    # another model (a student, a modality subset) against the dense runs' (indicative, as
    # step times)
    flops = [r["flops"] / dense_flops for r in rs if r.get("flops") and dense_flops]
    speed = [(r["dense_forward_ms"] if _same_model(r, dense_flops) else dense_ms)
             / r["forward_ms"] for r in rs if r.get("forward_ms") and dense_ms]
    rows.append(dict(
        name=name, config=rs[0]["config"], seeds=len(rs), accuracy=acc, accuracy_std=acc_std,
        flops=_mean_std([r.get("flops") for r in rs])[0],
        flops_ratio=_mean_std(flops)[0] if flops else None,
        throughput_ratio=_mean_std(speed)[0] if speed else None,
        sparsity=_mean_std([r["sparsity"] for r in rs])[0], bits=rs[0]["bits"],
        disk_bytes=disk, ratio=(dense_bytes / disk) if dense_bytes and disk else None,
        step_time_ratio=_mean_std(ratios)[0] if ratios else None,
        wall_s=sum(r["wall_s"] or 0 for r in rs), baseline=name in baselines))
  return rows


def _fmt(x, f, suffix=""):
  return "–" if x is None else format(x, f) + suffix


def _acc(r):
  std = f" ± {100 * r['accuracy_std']:.2f}" if r["seeds"] > 1 else ""
  return f"{100 * r['accuracy']:.2f}{std}% (n={r['seeds']})"


def table_md(rows, meta: str) -> str:
  lines = [meta, "",
           "| method | config | test accuracy (mean ± std) | sparsity | bits | bytes on disk "
           "| vs dense fp32 | step time vs dense | forward FLOPs vs dense | forward "
           "throughput vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['name']} | `{r['config']}` | {_acc(r)} | {_fmt(r['sparsity'], '.3f')} | "
        f"{r['bits']} | {_fmt(r['disk_bytes'], ',.0f')} | {_fmt(r['ratio'], '.2f', '×')} | "
        f"{_fmt(r['step_time_ratio'], '.2f', '×')} | {_fmt(r.get('flops_ratio'), '.3f', '×')}"
        f" | {_fmt(r.get('throughput_ratio'), '.2f', '×')} |")
  return "\n".join(lines) + "\n"


def pareto_front(points):
  """Indices of points no other point beats on both axes (fewer bytes, higher accuracy)."""
  front = []
  for i, (b, a) in enumerate(points):
    if not any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for b2, a2 in points):
      front.append(i)
  return sorted(front, key=lambda i: points[i][0])


def _stagger(points, min_dy):
  """Vertical label offsets (points) so labels of nearby points do not overlap: greedy,
  in order of x then y, over (log10 x, y) positions."""
  placed, offsets = [], {}
  for i, (x, y) in sorted(enumerate(points), key=lambda t: (t[1][0], t[1][1])):
    dy = 0
    while any(abs(math.log10(x) - math.log10(px)) < 0.12 and abs(y + dy - py) < min_dy
              for px, py in placed):
      dy += min_dy
    placed.append((x, y + dy))
    offsets[i] = dy
  return offsets


def plot(rows, path, title="mm_arith/procedural, small model"):
  """Two panels: every method (modality-subset baselines in gray), and a zoom on the methods
  within 5% of the best accuracy, where the compression methods crowd; each method keeps
  its color and marker in both, named in the legend. The Pareto front (fewest bytes for
  the accuracy) is over methods that see all modalities."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in rows if r["disk_bytes"] and r["accuracy"] is not None]
  main = [r for r in rows if not r["baseline"]]
  markers = "osD^vP*Xph<>"
  style = {r["name"]: dict(color=plt.get_cmap("tab20")(i % 20), marker=markers[i % len(markers)])
           for i, r in enumerate(main)}
  pts = [(r["disk_bytes"], 100 * r["accuracy"]) for r in main]
  front = pareto_front(pts)
  floor = 0.95 * max((p[1] for p in pts), default=100.0)  # the zoom panel's lower bound
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
  for k, ax in enumerate(axes):
    zoom = k == 1
    shown = [r for r in main if not zoom or 100 * r["accuracy"] >= floor]
    for r in shown:
      ax.errorbar(r["disk_bytes"], 100 * r["accuracy"], yerr=100 * r["accuracy_std"],
                  capsize=3, linestyle="none", markersize=7, label=r["name"],
                  **style[r["name"]])
    if not zoom:
      base = [r for r in rows if r["baseline"]]
      bpts = [(r["disk_bytes"], 100 * r["accuracy"]) for r in base]
      offs = _stagger(bpts, 6.0)
      for i, r in enumerate(base):
        ax.errorbar(*bpts[i], yerr=100 * r["accuracy_std"], color="0.5", marker="x",
                    capsize=3, linestyle="none",
                    label="modality-subset baselines" if i == 0 else None)
        ax.annotate(r["name"], bpts[i], fontsize=7, color="0.35", xytext=(5, 2 + offs[i]),
                    textcoords="offset points")
    fr = [i for i in front if not zoom or pts[i][1] >= floor]
    if fr:
      ax.step([pts[i][0] for i in fr], [pts[i][1] for i in fr], where="post", color="C3",
              alpha=0.5, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("within 5% of the best: the compression methods" if zoom else
                 "every method (mean ± std over seeds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.suptitle(f"{title}: accuracy against size on disk")
  fig.tight_layout(rect=(0, 0, 0.86, 1))
  fig.legend(handles, labels, loc="center right", fontsize=8)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_flops(rows, path, title="mm_arith/procedural, small model"):
  """Accuracy against one forward's FLOPs (XLA's count, per example), for the methods
  whose runs measured it, with the Pareto front (fewest FLOPs for the accuracy)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in rows if r.get("flops") and r["accuracy"] is not None
          and not r["baseline"]]
  if not rows:
    return False
  pts = [(r["flops"] / 1e6, 100 * r["accuracy"]) for r in rows]
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, r in enumerate(rows):
    ax.errorbar(*pts[i], yerr=100 * r["accuracy_std"], capsize=3, linestyle="none",
                marker="osD^vP*Xph<>"[i % 12], color=plt.get_cmap("tab20")(i % 20),
                label=r["name"])
  front = pareto_front(pts)
  ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="C3",
          alpha=0.5, label="Pareto front")
  ax.set_xlabel("forward MFLOPs per example (XLA cost analysis)")
  ax.set_ylabel("test accuracy (%)")
  ax.grid(True, alpha=0.3)
  ax.set_title(f"{title}: accuracy against compute")
  fig.tight_layout(rect=(0, 0, 0.78, 1))
  fig.legend(loc="center right", fontsize=8)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def publish(sweep_dir, readme=RESULTS_DOC, results_dir=RESULTS_DIR, log=print,
            dataset: str | None = None):
  """Copy the results into the repository and rewrite docs/results/suite.md's section between
  markers. The suite's dataset (mm_arith/procedural) has the plain names; another dataset's
  sweep gets files and a section of its own (`results_<tag>.md`, `<!--
  sweep-results:<tag>:begin -->`), so publishing it never overwrites the suite's."""
  tag = "" if dataset in (None, "mm_arith/procedural") else dataset.split("/")[-1]
  named = lambda f: f.replace(".", f"_{tag}.", 1) if tag else f
  begin, end = ((f"<!-- sweep-results:{tag}:begin -->", f"<!-- sweep-results:{tag}:end -->")
                if tag else (MARK_BEGIN, MARK_END))
  os.makedirs(results_dir, exist_ok=True)
  for f in ("results.md", "results.json", "pareto.png", "pareto_flops.png"):
    if os.path.exists(os.path.join(sweep_dir, f)):
      shutil.copy(os.path.join(sweep_dir, f), os.path.join(results_dir, named(f)))
  with open(os.path.join(results_dir, named("results.md"))) as f:
    table = f.read()
  rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(readme)))
  body = f"{table}\n![accuracy against bytes on disk]({rel}/{named('pareto.png')})"
  if os.path.exists(os.path.join(sweep_dir, "pareto_flops.png")):
    body += f"\n\n![accuracy against forward FLOPs]({rel}/{named('pareto_flops.png')})"
  rewrite_section(readme, begin, end, body)
  log(f"[sweep] {os.path.relpath(readme, REPO)} results section{f' ({tag})' if tag else ''} "
      f"rewritten from {results_dir}")


def rewrite_section(readme, begin, end, body):
  """Replace what stands between the `begin` and `end` markers of `readme` by `body`."""
  with open(readme) as f:
    text = f.read()
  if begin not in text or end not in text:
    raise ValueError(f"{readme} has no {begin} ... {end} section to rewrite.")
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(readme, "w") as f:
    f.write(f"{head}{begin}\n{body}\n{end}{tail}")


