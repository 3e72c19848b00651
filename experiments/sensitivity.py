"""Per-modality and per-layer sensitivity of a trained run to post-training compression, and
a size-budgeted allocation of bits per layer from it.

  python -m experiments.sensitivity --workdir=workdirs/dense [--method=gptq]
      [--settings=w2g32,w3g128,w4g128,w8c] [--budgets=w3g128,w4g128] [--out=<workdir>/sensitivity]

One process (`experiments/one_shot.py`): the Hessians of every compressible kernel are
taken once from the dense model (parallel mode), every kernel is solved once per setting,
and then one unit at a time is compressed, everything else dense, and evaluated on 512
validation examples drawn from the training split (never the test split):
  layers      each kernel alone, at each setting: the allocator's inputs
  towers      text / image / audio / fusion
  types       attention projections of the towers, MLPs, the fusion's cross-attention
  blocks      each block of each tower, each fusion layer
  w8a8        each tower with int8 weights and int8 inputs (per tensor, calibrated), the
              published CLIP comparison (W8A8 of the vision tower alone keeps 62.9 of 63.4)
Outputs in --out: sensitivity.json, sensitivity.md (accuracy and loss deltas by unit),
heatmap.png (loss increase per kernel at the lowest setting: rows tower/block, columns the
kernel), and for each budget allocation_<budget>.json: the per-kernel widths the greedy
allocator (`mmjax.compress.allocate`) chose within the bytes of the uniform setting named,
usable as `--config=experiments/configs/post_training.py:alloc=<that file>`.
Any model the harness trains: the kernels are its family's "matmul" pattern (2-D), towers
the first component of their paths, blocks the first two, types the family's
`unit_types`; accuracy is the run's task's metric. For a model outside the harness,
`mmjax.compress.allocate.greedy` takes any {layer: [Candidate(setting, bytes, loss
increase)]} measured however that model is run.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

from absl import app, flags

def parse_setting(name: str):
  from mmjax.compress import formats
  m = re.fullmatch(r"w(\d)(?:g(\d+)|c)", name)
  if not m:
    raise ValueError(f"setting {name!r} must look like w4g128 or w8c.")
  bits, group = int(m.group(1)), m.group(2)
  return formats.grid("int", bits, granularity="group" if group else "channel",
                      group_size=int(group or 128), ragged=True)


def tower_of(path: str) -> str:
  return path.split("/")[0]


def block_of(path: str) -> str:
  return "/".join(path.split("/")[:2])


def solve_all(session, paths, grids, method):
  """{setting: {path: compressed kernel}} from one pass of dense statistics."""
  import jax.numpy as jnp
  from mmjax.compress import flatten, layout
  from mmjax.compress.post_training import obs, stats
  flat = flatten(session.params)
  h = {}
  if method == "gptq":
    st, _ = stats.collect(session.apply, session.params, session.calibration, paths, ("gram",))
    h = {p: st[p]["gram"] for p in paths}
  out = {}
  for name, grid in grids.items():
    out[name] = {}
    for p in paths:
      w = jnp.asarray(flat[p])
      if method == "gptq":
        r = obs.solve(layout.to_matrix(w, (0,)), h[p], grid=grid)
        if not bool(r.ok):
          raise ValueError(f"the Hessian of {p} is not positive definite.")
        out[name][p] = r.w.reshape(w.shape)
      else:
        out[name][p] = grid.round_matrix(w, *grid.fit(w))
  return out


def measure(session, solved, units: dict) -> dict:
  """{unit: {setting: {loss, accuracy, d_loss, d_acc}}}."""
  res = {}
  for unit, paths in units.items():
    res[unit] = {}
    for name, leaves in solved.items():
      m = session.evaluate(session.with_leaves({p: leaves[p] for p in paths}))
      res[unit][name] = dict(m, d_loss=m["loss"] - session.dense["loss"],
                             d_acc=m["accuracy"] - session.dense["accuracy"])
  return res


def w8a8_by_tower(session, paths, towers=None) -> dict:
  """W8A8 of each tower's compressible kernels alone (`towers`: a subset; default all)."""
  from mmjax.compress import Plan, activations, formats, rules
  from mmjax.compress.post_training import rtn
  out = {}
  for tower in sorted(towers or {tower_of(p) for p in paths}):
    pattern = f"(?={re.escape(tower)}/)(?:{session.family.patterns['matmul']})"
    plan = Plan(rules([(pattern, rtn.method(formats.grid("int", 8, granularity="channel")))]),
                rules([(pattern, activations.inputs(8))]))
    params, cstate = session.compress(plan)
    m = session.evaluate_plan(plan, params, cstate)
    out[tower] = dict(m, d_loss=m["loss"] - session.dense["loss"],
                      d_acc=m["accuracy"] - session.dense["accuracy"])
  return out


def allocate(layers: dict, shapes: dict, grids: dict, budget_grid):
  """The greedy allocation within the bytes every kernel takes at `budget_grid`."""
  from mmjax.compress import allocate as alloc
  from experiments.one_shot import kernel_bytes
  cands = {p: [alloc.Candidate(n, kernel_bytes(shapes[p], grids[n]), r[n]["d_loss"])
               for n in grids] for p, r in layers.items()}
  budget = sum(kernel_bytes(shapes[p], budget_grid) for p in layers)
  dense = sum(kernel_bytes(shapes[p], None) for p in layers)
  choice = alloc.greedy(cands, budget, dense)
  return choice, budget


def heatmap(layers: dict, setting: str, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  rows = sorted({"/".join(p.split("/")[:-2]) for p in layers})
  cols = sorted({p.split("/")[-2] for p in layers})
  grid = np.full((len(rows), len(cols)), np.nan)
  for p, r in layers.items():
    grid[rows.index("/".join(p.split("/")[:-2])), cols.index(p.split("/")[-2])] = r[setting][
        "d_loss"]
  fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 3, 0.35 * len(rows) + 1.5))
  im = ax.imshow(grid, cmap="magma_r", aspect="auto")
  ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
  ax.set_yticks(range(len(rows)), rows, fontsize=7)
  ax.set_title(f"loss increase, one kernel at {setting} (everything else dense)")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _row(name, r):
  return f"| {name} | {r['accuracy']:.2%} | {100 * r['d_acc']:+.2f} | {r['d_loss']:+.4f} |"


def table_md(result) -> str:
  lines = [f"Dense (validation, {result['val_examples']} training examples): accuracy "
           f"{result['dense']['accuracy']:.2%}, loss {result['dense']['loss']:.4f}. Method "
           f"{result['method']}, settings {', '.join(result['settings'])}.", ""]
  for kind in ("towers", "types", "blocks"):
    lines += [f"**{kind}**", "", "| unit | " + " | ".join(
        f"{s} acc / Δacc pt / Δloss" for s in result["settings"]) + " |",
              "|---|" + "---|" * len(result["settings"])]
    for unit, r in result[kind].items():
      lines.append(f"| {unit} | " + " | ".join(
          f"{r[s]['accuracy']:.2%} / {100 * r[s]['d_acc']:+.2f} / {r[s]['d_loss']:+.4f}"
          for s in result["settings"]) + " |")
    lines.append("")
  lines += ["**W8A8 by tower** (int8 weights per channel, int8 inputs per tensor)", "",
            "| tower | accuracy | Δacc pt | Δloss |", "|---|---|---|---|"]
  lines += [_row(t, r) for t, r in result["w8a8"].items()]
  for a in result.get("allocations", []):
    lines += ["", f"**allocation within {a['budget_setting']}'s bytes** "
              f"({a['budget_bytes']:,.0f} B of kernels): widths chosen "
              f"{a['counts']}; by tower {a['by_tower']}. Validation (parallel solves): "
              f"allocated {a['allocated']['accuracy']:.2%} (loss {a['allocated']['loss']:.4f})"
              + (f" vs uniform {a['uniform']['accuracy']:.2%} (loss "
                 f"{a['uniform']['loss']:.4f})" if a["uniform"] else "")
              + f" at {a['bytes']:,.0f} vs {a['uniform_bytes']:,.0f} B."]
  return "\n".join(lines) + "\n"


def run(workdir, out, method="gptq", settings=("w2g32", "w3g128", "w4g128", "w8c"),
        budgets=("w3g128", "w4g128"), data_dir=None, calib_examples=128, calib_seed=0,
        val_examples=512, w8a8_towers=None, log=print) -> dict:
  from experiments.one_shot import Session
  from mmjax.compress import flatten
  grids = {s: parse_setting(s) for s in settings}
  budget_grids = {b: parse_setting(b) for b in budgets}
  t0 = time.perf_counter()
  session = Session(workdir, data_dir=data_dir, calib_examples=calib_examples,
                    calib_seed=calib_seed, val_examples=val_examples)
  flat = flatten(session.params)
  paths = sorted(p for p in flat if re.fullmatch(session.family.patterns["matmul"], p))
  if not paths:
    raise ValueError(f"model family {session.family.name!r}: its matmul pattern "
                     f"{session.family.patterns['matmul']!r} matches no parameter.")
  for p in paths:
    for g in grids.values():
      g.check(flat[p].shape[0], f"{p}: ")
  shapes = {p: tuple(flat[p].shape) for p in paths}
  log(f"[sensitivity] dense validation accuracy {session.dense['accuracy']:.4f}; solving "
      f"{len(paths)} kernels x {len(grids)} settings")
  solved = solve_all(session, paths, grids, method)
  log(f"[sensitivity] solved in {time.perf_counter() - t0:.0f} s; measuring")
  towers = {t: [p for p in paths if tower_of(p) == t] for t in sorted({tower_of(p) for p in paths})}
  types = {k: [p for p in paths if re.fullmatch(v, p)]
           for k, v in session.family.unit_types.items()}
  blocks = {b: [p for p in paths if block_of(p) == b] for b in sorted({block_of(p) for p in paths})}
  result = dict(workdir=workdir, method=method, settings=list(settings),
                dense=session.dense, val_examples=sum(len(b["label"]) for b in session.val),
                towers=measure(session, solved, towers), types=measure(session, solved, types),
                blocks=measure(session, solved, blocks),
                layers=measure(session, solved, {p: [p] for p in paths}),
                w8a8=w8a8_by_tower(session, paths, w8a8_towers), allocations=[])
  from experiments.one_shot import kernel_bytes
  for b in budgets:
    choice, budget = allocate(result["layers"], shapes, grids, budget_grids[b])
    leaves = {p: solved[c.setting][p] for p, c in choice.items()}
    counts = {s: sum(c.setting == s for c in choice.values()) for s in settings}
    by_tower = {t: {s: sum(choice[p].setting == s for p in ps) for s in settings
                    if any(choice[p].setting == s for p in ps)} for t, ps in towers.items()}
    alloc = dict(budget_setting=b, budget_bytes=budget,
                 bytes=sum(c.bytes for c in choice.values()),
                 uniform_bytes=budget, counts=counts, by_tower=by_tower,
                 choice={p: c.setting for p, c in choice.items()},
                 allocated=session.evaluate(session.with_leaves(leaves)),
                 uniform=session.evaluate(session.with_leaves(solved[b])) if b in solved
                 else None)
    result["allocations"].append(alloc)
    os.makedirs(out, exist_ok=True)
    write_allocation(os.path.join(out, f"allocation_{b}.json"), alloc, grids)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "sensitivity.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out, "sensitivity.md"), "w") as f:
    f.write(table_md(result))
  heatmap(result["layers"], settings[0], os.path.join(out, "heatmap.png"))
  result["wall_s"] = time.perf_counter() - t0
  log(table_md(result))
  log(f"[sensitivity] wrote sensitivity.md/.json, heatmap.png in {out} "
      f"({result['wall_s']:.0f} s)")
  return result


def write_allocation(path, alloc, grids):
  """The allocation as config.compress.post_training.rules: one exact-path rule a kernel."""
  rules = []
  for p, s in sorted(alloc["choice"].items()):
    g = grids[s]
    rules.append([re.escape(p), dict(bits=g.bits, granularity=g.granularity,
                                     group_size=g.group_size, ragged_groups=g.ragged)])
  with open(path, "w") as f:
    json.dump(dict(budget_setting=alloc["budget_setting"], budget_bytes=alloc["budget_bytes"],
                   bytes=alloc["bytes"], rules=rules), f, indent=1)


def _define_flags():
  """The command line (defined only when run as a script: the sweep imports this module)."""
  global _WORKDIR, _DATA, _METHOD, _SETTINGS, _BUDGETS, _CALIB, _CALIB_SEED, _OUT
  _WORKDIR = flags.DEFINE_string("workdir", None, "the dense run to analyse")
  _DATA = flags.DEFINE_string("data_dir", None, "dataset directory (default: the run's)")
  _METHOD = flags.DEFINE_enum("method", "gptq", ["gptq", "rtn"], "how each unit is compressed")
  _SETTINGS = flags.DEFINE_string("settings", "w2g32,w3g128,w4g128,w8c",
                                  "weight settings: w<bits>g<group> or w<bits>c (per channel)")
  _BUDGETS = flags.DEFINE_string("budgets", "w3g128,w4g128",
                                 "allocate within the bytes of these uniform settings ('' none)")
  _CALIB = flags.DEFINE_integer("calib_examples", 128, "calibration examples")
  _CALIB_SEED = flags.DEFINE_integer("calib_seed", 0, "calibration shuffle seed")
  _OUT = flags.DEFINE_string("out", None, "output directory (default <workdir>/sensitivity)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir (the dense run) is required.")
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  try:
    run(_WORKDIR.value, _OUT.value or os.path.join(_WORKDIR.value, "sensitivity"),
        _METHOD.value, tuple(s for s in _SETTINGS.value.split(",") if s),
        tuple(b for b in _BUDGETS.value.split(",") if b), _DATA.value, _CALIB.value,
        _CALIB_SEED.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
