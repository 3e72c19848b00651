"""The one-shot post-training suite (no fine-tuning), run by `experiments/sweep.py
--section=post_training` on a dataset's dense runs.

Every row is `experiments/configs/post_training.py:<args>` run by the harness with
train.steps=0 (calibrate, compress, evaluate on the test split, export): on each dense seed
and, for the methods that read calibration data, each calibration seed (mean ± std over
all of them). Workdirs: <sweep_dir>/pt/<row>/seed_<dense>_calib_<calib>. The allocator
rows first run `experiments/sensitivity.py` on the dense run (once per dense seed, in
<sweep_dir>/sensitivity/seed_<s>) and then GPTQ with the widths it chose, within the bytes
of the uniform setting they are compared with.

Outputs (experiments/post_training_report.py) in the sweep dir: post_training.md / .json (rows, where methods of a family
separate, the papers' orderings), pareto_post_training.png (accuracy against bytes on disk,
with the trained suite's methods when its results.json is given).
"""
from __future__ import annotations

import json
import os

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
    # recovery (protocol v2): the one-shot result, then LoRA adapters (rank 8) trained for
    # 300 steps by distillation from the dense run, the codes frozen
    "gptq_w3c+lora8": ("method=gptq,bits=3,group=0,lora=8", True),
    "gptq_w2g32+lora8": ("method=gptq,bits=2,group=32,lora=8", True),
    # modality-balanced calibration (MBQ): tokens weighted by the loss's sensitivity to
    # them, each modality's mean (_mbq) or each token's own (_tok)
    "gptq_w3c_mbq": ("method=gptq,bits=3,group=0,balance=modality", True),
    "gptq_w3c_tok": ("method=gptq,bits=3,group=0,balance=token", True),
    "gptq_w2g32_mbq": ("method=gptq,bits=2,group=32,balance=modality", True),
    "gptq_w2g32_tok": ("method=gptq,bits=2,group=32,balance=token", True),
    "awq_w3c_mbq": ("method=awq,bits=3,group=0,balance=modality", True),
    "awq_w3c_tok": ("method=awq,bits=3,group=0,balance=token", True),
    "awq_w2g32": ("method=awq,bits=2,group=32", True),
    "awq_w2g32_mbq": ("method=awq,bits=2,group=32,balance=modality", True),
    "awq_w2g32_tok": ("method=awq,bits=2,group=32,balance=token", True),
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
    "LoRA recovery after GPTQ": ["gptq_w3c", "gptq_w3c+lora8", "gptq_w2g32", "gptq_w2g32+lora8"],
    "GPTQ 3-bit, modality-balanced": ["gptq_w3c", "gptq_w3c_mbq", "gptq_w3c_tok"],
    "GPTQ 2-bit g32, modality-balanced": ["gptq_w2g32", "gptq_w2g32_mbq", "gptq_w2g32_tok"],
    "AWQ 3-bit, modality-balanced": ["awq_w3c", "awq_w3c_mbq", "awq_w3c_tok"],
    "AWQ 2-bit g32, modality-balanced": ["awq_w2g32", "awq_w2g32_mbq", "awq_w2g32_tok"],
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
  if config.compress.get("distill"):  # recovery rows distill from the same dense run
    config.compress.distill.teacher = config.init
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


def _dense_seed(record) -> str:
  return str(record["seed"]).split(".")[0]


def consistent_carried(carried, seeds, sweep_dir, log=print) -> dict:
  """`carried` less the runs of every dense seed that this sweep dir trained again to a
  different model. Dense training repeats bit for bit on one machine, not across machines
  (XLA's CPU code differs with the processor: procedural seed 0 gave 99.00% on one and
  98.55% on another), and a seed's rows must all start from one dense model, so a seed
  retrained to another model has its carried runs dropped and rerun. Compared: the test
  accuracy and, where both records have it, the test loss."""
  from experiments import results
  from experiments.results import is_complete
  from experiments.results import run_dir as dense_run_dir
  old = {_dense_seed(r): r for r in carried.get("dense", [])}
  for s in range(seeds):
    wd = dense_run_dir(sweep_dir, "dense", s)
    if str(s) not in old or not is_complete(wd):
      continue
    here, there = results.run_record("dense", s, wd), old[str(s)]
    same = here["accuracy"] == there["accuracy"] and (
        here.get("loss") is None or there.get("loss") is None or here["loss"] == there["loss"])
    if same:
      continue
    n = sum(1 for rs in carried.values() for r in rs if _dense_seed(r) == str(s))
    log(f"[pt] dense seed {s} trained here reaches {here['accuracy']:.2%}, the carried one "
        f"{there['accuracy']:.2%}: another dense model (training repeats bit for bit only on "
        f"one machine), so its {n} carried runs are dropped and run again from this one.")
    carried = {row: [r for r in rs if _dense_seed(r) != str(s)] for row, rs in carried.items()}
  return carried


def _carried_keys(carried) -> set:
  return {(row, str(r["seed"])) for row, rs in carried.items() for r in rs}


def pending_seeds(rows, seeds, calib_seeds, sweep_dir, carried=None) -> list:
  """Dense seeds with at least one run of `rows` neither carried nor complete: the dense
  seeds that must be (re)trained (or, already trained here, have rows to run). A seed
  retrained on another machine may be another model: `consistent_carried` then drops its
  carried runs."""
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
  from mmjax.harness import train
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
