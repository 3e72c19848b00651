"""The suite's targets (accuracy and size goals set for mmjax), checked against the results.

Each check reads the per-method rows of `results.aggregate` (accuracy means and stds over
seeds, compression ratios) and says what was measured and whether the target is met, so
the results table and its verdicts come from the same command and cannot drift apart.
A method that has not run yet gives "not run" instead of a verdict.
"""
from __future__ import annotations

CHANCE_MAX = 0.20          # "near chance" for the 10-way task
IMAGE_AUDIO = (0.55, 0.65)  # "near its 60% ceiling": the digits without the operation


def _pct(x):
  return f"{100 * x:.2f}%"


def check(rows: list) -> list:
  """[(target, measured, verdict)] with verdict True / False / None (not run)."""
  by = {r["name"]: r for r in rows}
  out = []

  def need(*names):
    return all(n in by and by[n]["accuracy"] is not None for n in names)

  def rel(name, frac, label):
    target = f"{label} ≥ {100 * frac:.0f}% of dense"
    if not need(name, "dense"):
      out.append((target, "not run", None))
      return
    r = by[name]["accuracy"] / by["dense"]["accuracy"]
    out.append((target, f"{_pct(by[name]['accuracy'])} = {100 * r:.1f}% of dense", r >= frac))

  if need("dense"):
    out.append(("dense ≥ 95%", _pct(by["dense"]["accuracy"]), by["dense"]["accuracy"] >= 0.95))
  else:
    out.append(("dense ≥ 95%", "not run", None))
  for name in ("only_text", "only_image", "only_audio", "text+image", "text+audio"):
    target = f"{name} near chance (≤ {100 * CHANCE_MAX:.0f}%)"
    out.append((target, _pct(by[name]["accuracy"]), by[name]["accuracy"] <= CHANCE_MAX)
               if need(name) else (target, "not run", None))
  lo, hi = IMAGE_AUDIO
  target = f"image+audio near its 60% ceiling ({100 * lo:.0f}–{100 * hi:.0f}%)"
  out.append((target, _pct(by["image+audio"]["accuracy"]),
              lo <= by["image+audio"]["accuracy"] <= hi)
             if need("image+audio") else (target, "not run", None))
  rel("prune90", 0.95, "90% gradual pruning")
  target = "90% gradual pruning better than one-shot 90%"
  if need("prune90", "prune90_oneshot"):
    a, b = by["prune90"], by["prune90_oneshot"]
    std = (f" (std {_pct(a['accuracy_std'])}, {_pct(b['accuracy_std'])})"
           if min(a["seeds"], b["seeds"]) > 1 else "")
    out.append((target, f"{_pct(a['accuracy'])} vs {_pct(b['accuracy'])}{std}",
                a["accuracy"] > b["accuracy"]))
  else:
    out.append((target, "not run", None))
  rel("qat_int8", 0.99, "int8 QAT")
  rel("ptq_int8", 0.98, "int8 PTQ")
  rel("nm24", 0.99, "2:4")
  rel("distill_student", 0.95, "distilled student (teacher = dense)")
  target = "distilled student beats the scratch student by more than the seed std"
  if need("distill_student", "scratch_student"):
    a, b = by["distill_student"], by["scratch_student"]
    gap, std = a["accuracy"] - b["accuracy"], max(a["accuracy_std"], b["accuracy_std"])
    measured = f"{_pct(a['accuracy'])} vs {_pct(b['accuracy'])}: gap {100 * gap:.2f} points"
    if min(a["seeds"], b["seeds"]) < 2:
      out.append((target, measured + " (one seed: no std yet)", None))
    else:
      out.append((target, measured + f", larger std {100 * std:.2f}", gap > std))
  else:
    out.append((target, "not run", None))
  target = "combined pipeline ≥ 10× smaller than dense fp32 at ≥ 95% of dense"
  if need("combined", "dense") and by["combined"]["ratio"]:
    c = by["combined"]
    r = c["accuracy"] / by["dense"]["accuracy"]
    out.append((target, f"{c['ratio']:.2f}× smaller at {_pct(c['accuracy'])} = "
                        f"{100 * r:.1f}% of dense", c["ratio"] >= 10 and r >= 0.95))
  else:
    out.append((target, "not run", None))
  return out


def table_md(checks: list) -> str:
  mark = {True: "met", False: "**missed**", None: "–"}
  lines = ["| target | measured (mean over seeds) | verdict |", "|---|---|---|"]
  lines += [f"| {t} | {m} | {mark[v]} |" for t, m, v in checks]
  return "\n".join(lines) + "\n"
