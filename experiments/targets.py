"""The suite's targets (accuracy and size goals set for mmjax), checked against the results.

Each check reads the per-method rows of `results.aggregate` (accuracy means and stds over
seeds, compression ratios) and says what was measured and whether the target is met, so
the results table and its verdicts come from the same command and cannot drift apart.
A method that has not run yet gives "not run" instead of a verdict.
"""
from __future__ import annotations

DATASET = "mm_arith/procedural"  # the dataset the targets are set for
CHANCE_MAX = 0.20          # "near chance" for the 10-way task
IMAGE_AUDIO = (0.55, 0.65)  # "near its 60% ceiling": the digits without the operation


def _pct(x):
  return f"{100 * x:.2f}%"


def check(rows: list) -> list:
  """[(target, measured, verdict)] with verdict True / False / None (not run)."""
  by = {r["name"]: r for r in rows}
  out = []

  def add(target, names, judge):
    """Appends judge(*rows) -> (measured, verdict), or "not run" if any row is missing."""
    if all(n in by and by[n]["accuracy"] is not None for n in names):
      out.append((target, *judge(*(by[n] for n in names))))
    else:
      out.append((target, "not run", None))

  def rel(name, frac, label):
    def judge(r, dense):
      q = r["accuracy"] / dense["accuracy"]
      return f"{_pct(r['accuracy'])} = {100 * q:.1f}% of dense", q >= frac
    add(f"{label} ≥ {100 * frac:.0f}% of dense", (name, "dense"), judge)

  add("dense ≥ 95%", ("dense",), lambda d: (_pct(d["accuracy"]), d["accuracy"] >= 0.95))
  for name in ("only_text", "only_image", "only_audio", "text+image", "text+audio"):
    add(f"{name} near chance (≤ {100 * CHANCE_MAX:.0f}%)", (name,),
        lambda r: (_pct(r["accuracy"]), r["accuracy"] <= CHANCE_MAX))
  lo, hi = IMAGE_AUDIO
  add(f"image+audio near its 60% ceiling ({100 * lo:.0f}–{100 * hi:.0f}%)", ("image+audio",),
      lambda r: (_pct(r["accuracy"]), lo <= r["accuracy"] <= hi))
  rel("prune90", 0.95, "90% gradual pruning")

  def gradual_vs_oneshot(a, b):
    std = (f" (std {_pct(a['accuracy_std'])}, {_pct(b['accuracy_std'])})"
           if min(a["seeds"], b["seeds"]) > 1 else "")
    return f"{_pct(a['accuracy'])} vs {_pct(b['accuracy'])}{std}", a["accuracy"] > b["accuracy"]
  add("90% gradual pruning better than one-shot 90%", ("prune90", "prune90_oneshot"),
      gradual_vs_oneshot)
  rel("qat_int8", 0.99, "int8 QAT")
  rel("ptq_int8", 0.98, "int8 PTQ")
  rel("nm24", 0.99, "2:4")
  rel("distill_student", 0.95, "distilled student (teacher = dense)")

  def distilled_vs_scratch(a, b):
    gap, std = a["accuracy"] - b["accuracy"], max(a["accuracy_std"], b["accuracy_std"])
    measured = f"{_pct(a['accuracy'])} vs {_pct(b['accuracy'])}: gap {100 * gap:.2f} points"
    if min(a["seeds"], b["seeds"]) < 2:
      return measured + " (one seed: no std yet)", None
    return measured + f", larger std {100 * std:.2f}", gap > std
  add("distilled student beats the scratch student by more than the seed std",
      ("distill_student", "scratch_student"), distilled_vs_scratch)

  def combined(c, dense):
    if not c["ratio"]:
      return "no size measured", None
    q = c["accuracy"] / dense["accuracy"]
    return (f"{c['ratio']:.2f}× smaller at {_pct(c['accuracy'])} = {100 * q:.1f}% of dense",
            c["ratio"] >= 10 and q >= 0.95)
  add("combined pipeline ≥ 10× smaller than dense fp32 at ≥ 95% of dense",
      ("combined", "dense"), combined)
  return out


def table_md(checks: list) -> str:
  mark = {True: "met", False: "**missed**", None: "–"}
  lines = ["| target | measured (mean over seeds) | verdict |", "|---|---|---|"]
  lines += [f"| {t} | {m} | {mark[v]} |" for t, m, v in checks]
  return "\n".join(lines) + "\n"
