"""The one-shot post-training suite (no fine-tuning), run by `experiments/sweep.py
--section=post_training` on a dataset's dense runs.

Every row is `experiments/configs/post_training.py:<args>` run by the harness with
train.steps=0 (calibrate, compress, evaluate on the test split, export): on each dense seed
and, for the methods that read calibration data, each calibration seed (mean ± std over
all of them). Workdirs: <sweep_dir>/pt/<row>/seed_<dense>_calib_<calib>. The allocator
rows first run `experiments/sensitivity.py` on the dense run (once per dense seed, in
<sweep_dir>/sensitivity/seed_<s>) and then GPTQ with the widths it chose, within the bytes
of the uniform setting they are compared with.

Outputs in the sweep dir: post_training.md / .json (rows, where methods of a family
separate, the papers' orderings), pareto_post_training.png (accuracy against bytes on disk,
with the trained suite's methods when its results.json is given).
"""
from __future__ import annotations

import json
import os
import statistics

# name -> (post_training.py arguments, reads calibration data)
ROWS = {
    "rtn_w4g128": ("method=rtn,bits=4", False),
    "gptq_w4g128": ("method=gptq,bits=4", True),
    "awq_w4g128": ("method=awq,bits=4", True),
    "rtn_w4c": ("method=rtn,bits=4,group=0", False),
    "gptq_w4c": ("method=gptq,bits=4,group=0", True),
    "awq_w4c": ("method=awq,bits=4,group=0", True),
    "rtn_w3g128": ("method=rtn,bits=3", False),
    "gptq_w3g128": ("method=gptq,bits=3", True),
    "awq_w3g128": ("method=awq,bits=3", True),
    "rtn_w3c": ("method=rtn,bits=3,group=0", False),
    "gptq_w3c": ("method=gptq,bits=3,group=0", True),
    "awq_w3c": ("method=awq,bits=3,group=0", True),
    "rtn_w2g32": ("method=rtn,bits=2,group=32", False),
    "gptq_w2g32": ("method=gptq,bits=2,group=32", True),
    "rtn_w2g32_asym": ("method=rtn,bits=2,group=32,asym", False),
    "gptq_w2g32_asym": ("method=gptq,bits=2,group=32,asym", True),
    "w8a8_rtn": ("method=rtn,bits=8,group=0,w8a8", True),
    "w8a8_smoothquant": ("method=smoothquant", True),
    "w8a8_fp8_e4m3": ("method=rtn,format=fp8_e4m3,group=0,w8a8", True),
    "magnitude_50": ("method=magnitude,sparsity=0.5", False),
    "wanda_50": ("method=wanda,sparsity=0.5", True),
    "sparsegpt_50": ("method=sparsegpt,sparsity=0.5", True),
    "magnitude_70": ("method=magnitude,sparsity=0.7", False),
    "wanda_70": ("method=wanda,sparsity=0.7", True),
    "sparsegpt_70": ("method=sparsegpt,sparsity=0.7", True),
    "magnitude_90": ("method=magnitude,sparsity=0.9", False),
    "wanda_90": ("method=wanda,sparsity=0.9", True),
    "sparsegpt_90": ("method=sparsegpt,sparsity=0.9", True),
    "magnitude_2:4": ("method=magnitude,nm=2:4", False),
    "wanda_2:4": ("method=wanda,nm=2:4", True),
    "sparsegpt_2:4": ("method=sparsegpt,nm=2:4", True),
    "sparsegpt_2:4+gptq_w4": ("method=sparsegpt,nm=2:4,joint,bits=4", True),
    "gptq_w3c_parallel": ("method=gptq,bits=3,group=0,parallel", True),
    "sparsegpt_70_parallel": ("method=sparsegpt,sparsity=0.7,parallel", True),
    "alloc_at_w3g128": ("alloc=<sensitivity>/allocation_w3g128.json", True),
    "alloc_at_w4g128": ("alloc=<sensitivity>/allocation_w4g128.json", True),
}
FAMILIES = {
    "4-bit, group 128": ["rtn_w4g128", "gptq_w4g128", "awq_w4g128"],
    "4-bit, per channel": ["rtn_w4c", "gptq_w4c", "awq_w4c"],
    "3-bit, group 128": ["rtn_w3g128", "gptq_w3g128", "awq_w3g128"],
    "3-bit, per channel": ["rtn_w3c", "gptq_w3c", "awq_w3c"],
    "2-bit, group 32": ["rtn_w2g32", "gptq_w2g32"],
    "2-bit, group 32, zero point": ["rtn_w2g32_asym", "gptq_w2g32_asym"],
    "W8A8": ["w8a8_rtn", "w8a8_smoothquant", "w8a8_fp8_e4m3"],
    "50% unstructured": ["magnitude_50", "wanda_50", "sparsegpt_50"],
    "70% unstructured": ["magnitude_70", "wanda_70", "sparsegpt_70"],
    "90% unstructured": ["magnitude_90", "wanda_90", "sparsegpt_90"],
    "2:4": ["magnitude_2:4", "wanda_2:4", "sparsegpt_2:4"],
    "GPTQ 3-bit, sequential vs parallel": ["gptq_w3c", "gptq_w3c_parallel"],
    "SparseGPT 70%, sequential vs parallel": ["sparsegpt_70", "sparsegpt_70_parallel"],
    "mixed widths at 3-bit g128's size": ["gptq_w3g128", "alloc_at_w3g128"],
    "mixed widths at 4-bit g128's size": ["gptq_w4g128", "alloc_at_w4g128"],
}
# the papers' orderings (OPT-125M WikiText2 perplexity) this suite checks: (better, worse)
PAPERS = [
    ("gptq_w4c", "rtn_w4c", "GPTQ 4-bit beats RTN (perplexity 31.12 vs 37.28, dense 27.65)"),
    ("gptq_w3c", "rtn_w3c", "GPTQ 3-bit beats RTN by far (53.85 vs 1.3e3)"),
    ("sparsegpt_50", "magnitude_50", "SparseGPT beats magnitude at 50% one-shot"),
    ("wanda_50", "magnitude_50", "Wanda beats magnitude at 50% one-shot"),
    ("sparsegpt_70", "magnitude_70", "SparseGPT beats magnitude at 70% one-shot"),
    ("wanda_70", "magnitude_70", "Wanda beats magnitude at 70% one-shot"),
]
SEPARATE = 0.05  # a family separates when its best and worst mean accuracy differ by this


def select(patterns: str) -> list:
  import fnmatch
  chosen = [n for n in ROWS if any(fnmatch.fnmatchcase(n, p.strip())
                                   for p in patterns.split(",") if p.strip())]
  if not chosen:
    raise ValueError(f"--pt_rows={patterns!r} selects no post-training row; rows: "
                     f"{', '.join(ROWS)}.")
  return chosen


def run_dir(sweep_dir, row, seed, calib):
  return os.path.join(os.path.abspath(sweep_dir), "pt", row.replace(":", "of"),
                      f"seed_{seed}_calib_{calib}")


def runs_of(row, seeds, calib_seeds):
  calibrates = ROWS[row][1]
  return [(s, c) for s in range(seeds) for c in (range(calib_seeds) if calibrates else [0])]


def sensitivity_dir(sweep_dir, seed):
  return os.path.join(os.path.abspath(sweep_dir), "sensitivity", f"seed_{seed}")


def build_config(row, seed, calib, sweep_dir, tiny, data_dir, dataset):
  from experiments.configs import post_training
  from experiments.results import run_dir as dense_run_dir
  arg = ROWS[row][0].replace("<sensitivity>", sensitivity_dir(sweep_dir, seed))
  if tiny:  # the tiny model's kernels have 32 and 64 inputs: its groups are 32
    arg = arg.replace("g128.json", "g32.json")
  config = post_training.get_config(",".join(a for a in (arg, "tiny" if tiny else "") if a))
  config.seed = seed
  config.calibration.seed = calib
  config.init = dense_run_dir(sweep_dir, "dense", seed)
  if data_dir:
    config.data.data_dir = data_dir
  if dataset:
    config.data.dataset = dataset
  return config


def load_carried(path) -> dict:
  """The run records of an earlier publish (`runs` of post_training_<tag>.json): {"dense":
  [...], row: [...]}. A sweep given them skips those runs and reports them with its own, so
  a suite too long for one machine's life accumulates across machines; the published JSON
  is the state that survives."""
  if not path:
    return {}
  if not os.path.exists(path):
    raise ValueError(f"--pt_carry={path}: no such file; give an earlier publish's "
                     "post_training_<tag>.json, or '' to carry nothing.")
  with open(path) as f:
    try:
      runs = json.load(f).get("runs")
    except (json.JSONDecodeError, AttributeError):
      runs = None
  if not isinstance(runs, dict) or not isinstance(runs.get("dense"), list):
    raise ValueError(f"--pt_carry={path}: not a post-training results file (no 'runs' with "
                     "a 'dense' list); give experiments/results/post_training_<tag>.json.")
  unknown = set(runs) - set(ROWS) - {"dense"}
  if unknown:
    raise ValueError(f"--pt_carry={path}: rows {sorted(unknown)} are not rows of the suite.")
  return runs


def _carried_keys(carried) -> set:
  return {(row, str(r["seed"])) for row, rs in carried.items() for r in rs}


def pending_seeds(rows, seeds, calib_seeds, sweep_dir, carried=None) -> list:
  """Dense seeds with at least one run of `rows` neither carried nor complete: the dense
  seeds that must be (re)trained. Dense training is deterministic, so a retrained seed
  gives the carried runs' starting point again."""
  from experiments.results import is_complete
  have = _carried_keys(carried or {})
  return sorted({s for r in rows for s, c in runs_of(r, seeds, calib_seeds)
                 if (r, f"{s}.{c}") not in have
                 and not is_complete(run_dir(sweep_dir, r, s, c))})


def run_all(rows, seeds, calib_seeds, sweep_dir, tiny, data_dir, dataset, log=print,
            settings=None, budgets=None, adjust=None, w8a8_towers=None, carried=None,
            only_seeds=None):
  """Every (row, dense seed, calibration seed) not yet complete nor carried, seed-major
  (only the dense seeds in `only_seeds`, when given). `settings` and `budgets`: the
  sensitivity's candidate widths and the uniform settings it allocates at; `adjust(config)`
  edits each run's config last."""
  from experiments import sensitivity
  from experiments.results import is_complete
  from experiments.results import run_dir as dense_run_dir
  from mmjax import train
  todo = [(r, s, c) for s in range(seeds) for r in rows for (s2, c) in runs_of(r, seeds,
                                                                                calib_seeds)
          if s2 == s and (only_seeds is None or s in only_seeds)]
  have = _carried_keys(carried or {})
  for i, (row, seed, calib) in enumerate(todo, 1):
    workdir = run_dir(sweep_dir, row, seed, calib)
    if is_complete(workdir) or (row, f"{seed}.{calib}") in have:
      continue
    if row.startswith("alloc_"):
      out = sensitivity_dir(sweep_dir, seed)
      if not os.path.exists(os.path.join(out, "sensitivity.json")):
        log(f"[pt {i}/{len(todo)}] sensitivity of dense seed {seed} -> {out}")
        sensitivity.run(dense_run_dir(sweep_dir, "dense", seed), out, data_dir=data_dir,
                        settings=settings or (("w2g32", "w3g32", "w4g32", "w8c") if tiny else
                                              ("w2g32", "w3g128", "w4g128", "w8c")),
                        budgets=budgets or (("w3g32", "w4g32") if tiny else
                                            ("w3g128", "w4g128")),
                        val_examples=128 if tiny else 512, w8a8_towers=w8a8_towers,
                        log=lambda m: log("  " + m))
    log(f"[pt {i}/{len(todo)}] {row} dense seed {seed} calibration seed {calib} -> "
        f"{workdir}")
    config = build_config(row, seed, calib, sweep_dir, tiny, data_dir, dataset)
    if adjust is not None:
      adjust(config)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    train.train_and_evaluate(config, workdir, log=lambda m, p=f"  [{row}/{seed}.{calib}] ":
                             log(p + m) if "[compress]" in m or "eval" in m else None)


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
    best, worst = max(have, key=lambda r: r["accuracy"]), min(have, key=lambda r: r["accuracy"])
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
  README section (between `<!-- post-training:<config>:begin/end -->`)."""
  import shutil
  from experiments import results
  tag = dataset.split("/")[-1]
  readme = readme or results.README
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
  log(f"[sweep] README post-training section ({tag}) rewritten")
