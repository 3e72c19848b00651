"""The post-training suite's results: run records (the sweep dir's, else carried ones), rows
with mean ± std, where the methods of a family separate, the papers' orderings, the table,
the Pareto plot, and publishing to experiments/results/ and docs/results/post_training.md. The rows
themselves and running them: experiments/post_training_suite.py."""
from __future__ import annotations

import json
import os
import statistics

from experiments.post_training_suite import FAMILIES, PAPERS, ROWS, SEPARATE, run_dir, runs_of


def _mean_std(xs):
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def records(rows, seeds, calib_seeds, sweep_dir, log=print, carried=None) -> dict:
  """Each row's run records (and the dense runs'), in seed order: the sweep dir's complete
  runs, else the carried record of the same run."""
  from experiments import results
  from experiments.results import is_complete
  from experiments.results import run_dir as dense_run_dir
  carried = carried or {}
  old = {(row, str(r["seed"])): r for row, rs in carried.items() for r in rs}
  out = {"dense": []}
  for s in range(seeds):
    wd = dense_run_dir(sweep_dir, "dense", s)
    if is_complete(wd):
      out["dense"].append(results.run_record("dense", s, wd, "dense.py"))
    elif ("dense", str(s)) in old:
      out["dense"].append(old["dense", str(s)])
  for row in rows:
    out[row] = []
    for s, c in runs_of(row, seeds, calib_seeds):
      wd = run_dir(sweep_dir, row, s, c)
      if is_complete(wd):
        out[row].append(results.run_record(row, f"{s}.{c}", wd, ROWS[row][0]))
      elif (row, f"{s}.{c}") in old:
        out[row].append(old[row, f"{s}.{c}"])
  return out


def summarize(recs: dict) -> list:
  dense_acc = _mean_std([r["accuracy"] for r in recs["dense"]])[0]
  dense_bytes = _mean_std([r["disk_bytes"] for r in recs["dense"]])[0]
  rows = []
  for name, rs in recs.items():
    if not rs:
      continue
    acc, std = _mean_std([r["accuracy"] for r in rs])
    disk = _mean_std([r["disk_bytes"] for r in rs])[0]
    rows.append(dict(name=name, config=rs[0]["config"], n=len(rs), accuracy=acc,
                     accuracy_std=std, delta=None if dense_acc is None else acc - dense_acc,
                     sparsity=_mean_std([r.get("sparsity") for r in rs])[0],
                     bits=rs[0].get("bits"), disk_bytes=disk,
                     ratio=dense_bytes / disk if dense_bytes and disk else None,
                     wall_s=_mean_std([r["wall_s"] for r in rs])[0]))
  return rows


def separation(rows) -> list:
  by = {r["name"]: r for r in rows}
  out = []
  for fam, names in FAMILIES.items():
    have = [by[n] for n in names if n in by]
    if len(have) < 2:
      continue
    best = max(have, key=lambda r: r["accuracy"])  # the worst among the others: with
    worst = min([r for r in have if r is not best], key=lambda r: r["accuracy"])  # ties, two
    gap = best["accuracy"] - worst["accuracy"]
    out.append(dict(family=fam, best=best["name"], worst=worst["name"], gap=gap,
                    separates=gap >= SEPARATE))
  return out


def orderings(rows) -> list:
  by = {r["name"]: r for r in rows}
  out = []
  for better, worse, claim in PAPERS:
    if better in by and worse in by:
      a, b = by[better], by[worse]
      out.append(dict(claim=claim, better=better, worse=worse, better_acc=a["accuracy"],
                      worse_acc=b["accuracy"],
                      reproduced=a["accuracy"] > b["accuracy"] + max(a["accuracy_std"],
                                                                     b["accuracy_std"])))
  return out


def _pct(x, std=None):
  if x is None:
    return "–"
  return f"{100 * x:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "") + "%"


def table_md(rows, seps, ords, meta) -> str:
  lines = [meta, "", "| row | config | test accuracy (mean ± std, n) | vs dense | sparsity | "
           "bits | bytes on disk | vs dense fp32 | wall s / run |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    delta = "" if r["delta"] is None or r["name"] == "dense" else f"{100 * r['delta']:+.2f} pt"
    lines.append(
        f"| {r['name']} | `{r['config']}` | {_pct(r['accuracy'], r['accuracy_std'])} "
        f"(n={r['n']}) | {delta} | {r['sparsity'] or 0:.3f} | {r['bits']} | "
        f"{r['disk_bytes'] or 0:,.0f} | {(r['ratio'] or 0):.2f}× | {r['wall_s'] or 0:.0f} |")
  lines += ["", f"Where methods separate (best − worst mean accuracy of a family ≥ "
            f"{100 * SEPARATE:.0f} points):", "", "| family | best | worst | gap | separates |",
            "|---|---|---|---|---|"]
  for s in seps:
    lines.append(f"| {s['family']} | {s['best']} | {s['worst']} | {100 * s['gap']:.2f} pt | "
                 f"{'yes' if s['separates'] else 'no'} |")
  lines += ["", "The papers' orderings (reproduced: the better method's mean exceeds the "
            "other's by more than the larger std):", "",
            "| claim | here | reproduced |", "|---|---|---|"]
  for o in ords:
    lines.append(f"| {o['claim']} | {o['better']} {_pct(o['better_acc'])} vs {o['worse']} "
                 f"{_pct(o['worse_acc'])} | {'yes' if o['reproduced'] else 'no'} |")
  return "\n".join(lines) + "\n"


def plot(rows, trained_rows, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(11, 6))
  fams = {n: f for f, names in FAMILIES.items() for n in names}
  cmap = plt.get_cmap("tab20")
  colors = {f: cmap(i % 20) for i, f in enumerate(FAMILIES)}
  for r in rows:
    if not r["disk_bytes"] or r["accuracy"] is None:
      continue
    c = "k" if r["name"] == "dense" else colors.get(fams.get(r["name"]), "0.3")
    ax.errorbar(r["disk_bytes"], 100 * r["accuracy"], yerr=100 * (r["accuracy_std"] or 0),
                color=c, marker="o", capsize=2, linestyle="none")
    ax.annotate(r["name"], (r["disk_bytes"], 100 * r["accuracy"]), fontsize=6,
                xytext=(3, 2), textcoords="offset points")
  for r in trained_rows or []:
    if r.get("disk_bytes") and r.get("accuracy") is not None and not r.get("baseline"):
      ax.errorbar(r["disk_bytes"], 100 * r["accuracy"], yerr=100 * (r["accuracy_std"] or 0),
                  color="C3", marker="s", capsize=2, linestyle="none", alpha=0.6)
      ax.annotate(r["name"] + " (trained)", (r["disk_bytes"], 100 * r["accuracy"]),
                  fontsize=6, color="C3", xytext=(3, -8), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("bytes on disk (log scale)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title + " (circles: one-shot post-training; red squares: trained methods)",
               fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(rows, seeds, calib_seeds, sweep_dir, dataset, trained_results=None, log=print,
           carried=None, carried_from=None):
  recs = records(rows, seeds, calib_seeds, sweep_dir, log, carried)
  summary = summarize(recs)
  if not summary:
    raise ValueError(f"no complete run under {sweep_dir}: run the sweep first.")
  seps, ords = separation(summary), orderings(summary)
  n = sum(len(v) for v in recs.values())
  meta = (f"{dataset or 'mm_arith/procedural'}: {n} runs ({len(recs['dense'])} dense seeds; "
          f"calibrating methods × {calib_seeds} calibration seeds of 128 training examples; "
          "one-shot, no fine-tuning), sweep dir `" + sweep_dir + "`")
  old_ids = {id(r) for rs in (carried or {}).values() for r in rs}
  n_old = sum(1 for rs in recs.values() for r in rs if id(r) in old_ids)
  meta += (f", {n_old} of them carried from `{carried_from}`." if n_old and carried_from
           else ".")
  trained = None
  if trained_results and os.path.exists(trained_results):
    with open(trained_results) as f:
      trained = json.load(f)["methods"]
  md = table_md(summary, seps, ords, meta)
  os.makedirs(sweep_dir, exist_ok=True)
  with open(os.path.join(sweep_dir, "post_training.md"), "w") as f:
    f.write(md)
  with open(os.path.join(sweep_dir, "post_training.json"), "w") as f:
    json.dump(dict(meta=meta, rows=summary, separation=seps, orderings=ords, runs=recs), f,
              indent=1)
  plot(summary, trained, os.path.join(sweep_dir, "pareto_post_training.png"),
       dataset or "mm_arith/procedural")
  log(md)
  return dict(rows=summary, separation=seps, orderings=ords)


def publish(sweep_dir, dataset, readme=None, results_dir=None, log=print):
  """Copy one dataset's post-training results to experiments/results/ and rewrite its
  docs/results/post_training.md section (between `<!-- post-training:<config>:begin/end -->`)."""
  import shutil
  from experiments import results
  tag = dataset.split("/")[-1]
  readme = readme or results.POST_TRAINING_DOC
  results_dir = results_dir or results.RESULTS_DIR
  rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(readme)))
  os.makedirs(results_dir, exist_ok=True)
  names = {"post_training.md": f"post_training_{tag}.md",
           "post_training.json": f"post_training_{tag}.json",
           "pareto_post_training.png": f"pareto_post_training_{tag}.png"}
  for src, dst in names.items():
    shutil.copy(os.path.join(sweep_dir, src), os.path.join(results_dir, dst))
  extra = ""
  sens = os.path.join(sweep_dir, "sensitivity", "seed_0")
  if os.path.exists(os.path.join(sens, "heatmap.png")):
    shutil.copy(os.path.join(sens, "heatmap.png"),
                os.path.join(results_dir, f"sensitivity_{tag}.png"))
    shutil.copy(os.path.join(sens, "sensitivity.md"),
                os.path.join(results_dir, f"sensitivity_{tag}.md"))
  # a sweep that carried seed 0's runs keeps the sensitivity published with them
  if os.path.exists(os.path.join(results_dir, f"sensitivity_{tag}.md")):
    with open(os.path.join(results_dir, f"sensitivity_{tag}.md")) as f:
      extra = (f"\n\nSensitivity of dense seed 0 ({rel}/sensitivity_{tag}.md), one unit "
               f"compressed at a time, everything else dense:\n\n{f.read()}\n"
               f"![loss increase per kernel]({rel}/sensitivity_{tag}.png)")
  with open(os.path.join(results_dir, names["post_training.md"])) as f:
    table = f.read()
  results.rewrite_section(readme, f"<!-- post-training:{tag}:begin -->",
                          f"<!-- post-training:{tag}:end -->",
                          f"{table}\n![accuracy against bytes on disk]({rel}/"
                          f"{names['pareto_post_training.png']}){extra}")
  log(f"[sweep] {os.path.basename(readme)} post-training section ({tag}) rewritten")
