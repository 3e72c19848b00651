"""The post-training suite: the allocator's choices and its bad budgets, and, on the tiny
configs, sensitivity -> allocation -> a GPTQ run at the allocated widths through the
harness -> the report (rows, families, orderings) and its README section."""
import json
import os

import pytest

from mmjax.compress import allocate


def test_greedy_allocator_spends_bytes_where_loss_is_cheapest():
  C = allocate.Candidate
  cands = {"robust": [C("w8", 800, 0.0), C("w4", 400, 0.01), C("w2", 200, 0.02)],
           "fragile": [C("w8", 800, 0.0), C("w4", 400, 0.50), C("w2", 200, 3.00)]}
  got = allocate.greedy(cands, budget=1000, dense_bytes=3200)
  assert got["robust"].setting == "w2" and got["fragile"].setting == "w8"
  assert sum(c.bytes for c in got.values()) <= 1000
  assert {c.setting for c in allocate.greedy(cands, 1600).values()} == {"w8"}
  with pytest.raises(ValueError, match="below the smallest reachable size 400"):
    allocate.greedy(cands, 399)
  with pytest.raises(ValueError, match="not below the dense size"):
    allocate.greedy(cands, 3200, dense_bytes=3200)


def test_suite_sensitivity_allocation_and_report(procedural_dir, tiny_dense_dir, tmp_path):
  import shutil
  from experiments import post_training_report as ptr
  from experiments import post_training_suite as pts
  from experiments import results
  sweep_dir = str(tmp_path / "s")
  one_device = lambda c: setattr(c.mesh, "data", 1)
  # the sweep's dense run of seed 0 is the shared tiny dense run (same config, same seed)
  shutil.copytree(tiny_dense_dir, results.run_dir(sweep_dir, "dense", 0))
  rows = ["magnitude_50", "alloc_at_w3g128"]
  logs = []
  pts.run_all(rows, 1, 1, sweep_dir, True, procedural_dir, None, log=logs.append,
              settings=("w2g32", "w4g32"), budgets=("w3g32",), adjust=one_device,
              w8a8_towers=("image",))
  sens = json.load(open(os.path.join(pts.sensitivity_dir(sweep_dir, 0), "sensitivity.json")))
  assert set(sens["towers"]) == {"text", "image", "audio", "fusion"}
  assert set(sens["w8a8"]) == {"image"} and len(sens["layers"]) == 42
  alloc = sens["allocations"][0]
  assert alloc["bytes"] <= alloc["budget_bytes"] and sum(alloc["counts"].values()) == 42
  assert os.path.getsize(os.path.join(pts.sensitivity_dir(sweep_dir, 0), "heatmap.png")) > 0
  # the allocated run stores each kernel at the width it was given
  report = json.load(open(os.path.join(pts.run_dir(sweep_dir, "alloc_at_w3g128", 0, 0),
                                       "compression_report.json")))
  bits = {r["path"]: r["bits"] for r in report["leaves"]}
  assert all(bits[p] == int(s[1]) for p, s in alloc["choice"].items())
  out = ptr.report(rows, 1, 1, sweep_dir, None, log=lambda *_: None)
  names = [r["name"] for r in out["rows"]]
  assert names == ["dense", "magnitude_50", "alloc_at_w3g128"]
  md = open(os.path.join(sweep_dir, "post_training.md")).read()
  assert "| magnitude_50 | `method=magnitude,sparsity=0.5` |" in md and "(n=1)" in md
  readme = tmp_path / "README.md"
  readme.write_text("a\n<!-- post-training:procedural:begin -->\nold\n"
                    "<!-- post-training:procedural:end -->\nb\n")
  ptr.publish(sweep_dir, "mm_arith/procedural", readme=str(readme),
              results_dir=str(tmp_path / "results"), log=lambda *_: None)
  text = readme.read_text()
  assert "old" not in text and "| alloc_at_w3g128 |" in text and text.endswith("b\n")
  # a later machine: the published runs, carried into an empty sweep dir, need no training
  # and report the same rows; a second dense seed is what is left to run
  published = str(tmp_path / "results" / "post_training_procedural.json")
  carried = pts.load_carried(published)
  fresh = str(tmp_path / "fresh")
  assert pts.pending_seeds(rows, 1, 1, fresh, carried) == []
  assert pts.pending_seeds(rows, 2, 1, fresh, carried) == [1]
  again = ptr.report(rows, 1, 1, fresh, None, log=lambda *_: None, carried=carried,
                     carried_from=published)
  assert [(r["name"], r["accuracy"]) for r in again["rows"]] == [
      (r["name"], r["accuracy"]) for r in out["rows"]]
  assert "3 of them carried from" in open(os.path.join(fresh, "post_training.md")).read()
  # the same dense run here keeps the carried runs; a dense seed 0 retrained here to another
  # model (as on another machine) drops them: its rows are run again from the new one
  shutil.copytree(results.run_dir(sweep_dir, "dense", 0), results.run_dir(fresh, "dense", 0))
  assert pts.consistent_carried(carried, 1, fresh, log=logs.append) == carried
  summary = os.path.join(results.run_dir(fresh, "dense", 0), "summary.json")
  s = json.load(open(summary))
  json.dump(dict(s, eval_accuracy=s["eval_accuracy"] + 0.01), open(summary, "w"))
  kept = pts.consistent_carried(carried, 1, fresh, log=logs.append)
  assert all(rs == [] for rs in kept.values()) and "its 3 carried runs are dropped" in logs[-1]
  assert pts.pending_seeds(rows, 1, 1, fresh, kept) == [0]
  with pytest.raises(ValueError, match="not a post-training results file"):
    pts.load_carried(os.path.join(pts.sensitivity_dir(sweep_dir, 0), "sensitivity.json"))


def test_every_suite_row_builds_a_plan_on_tiny():
  """Config -> plan -> shape checks for each row (the harness runs some for real)."""
  from experiments import post_training_suite as pts
  from experiments.configs import post_training
  from mmjax.harness import compress_config, family
  shapes = None
  for row, (arg, calibrates) in pts.ROWS.items():
    if row.startswith("alloc"):
      continue
    c = post_training.get_config(f"{arg},tiny")
    if c.compress.get("distill"):  # recovery rows: the teacher is the dense run's model
      c.compress.distill.teacher_model = c.model
    fam = family.from_config(c)
    shapes = shapes or fam.param_shapes()
    comp = compress_config.build(c, fam, shapes, read_checkpoints=False)
    assert not comp.plan.is_identity, row
    if calibrates:  # the rows said to read calibration data do calibrate
      assert comp.calibration == (128, 0), row
