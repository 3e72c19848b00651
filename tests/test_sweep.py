"""The sweep: run selection, resume by skipping complete runs, aggregation over seeds,
the results table, the Pareto plot and README publishing, on the tiny configs."""
import json
import os

import pytest

from experiments import results, sweep


def test_select_by_name_and_glob_adds_the_dense_run_compression_needs():
  assert sweep.select("prune9*") == ["dense", "prune90", "prune95", "prune90_oneshot"]
  assert sweep.select("only_*") == ["only_text", "only_image", "only_audio"]
  assert sweep.select("scratch_student") == ["scratch_student"]
  assert sweep.select("*") == list(sweep.SUITE)
  with pytest.raises(ValueError, match="'prune42' matches no run"):
    sweep.select("prune42")


def test_pareto_front_keeps_only_undominated_points():
  pts = [(100, 0.90), (50, 0.95), (10, 0.80), (10, 0.70), (200, 0.99), (60, 0.94)]
  assert results.pareto_front(pts) == [2, 1, 4]


def test_sweep_runs_resumes_and_reports(procedural_dir, tiny_dense_dir, tmp_path):
  import shutil
  sweep_dir = str(tmp_path / "sweep")
  names = sweep.select("ptq_int8,only_image")
  assert names == ["dense", "only_image", "ptq_int8"]
  logs = []

  def one_device(config):
    config.mesh.data = 1
    config.train.measure_forward = 4  # the sweep's 64, made cheap

  # dense seed 0 is the shared tiny dense run (the same config and seed): complete, skipped
  shutil.copytree(tiny_dense_dir, sweep.run_dir(sweep_dir, "dense", 0))
  sweep.run_all(names, 2, sweep_dir, True, procedural_dir, log=logs.append, adjust=one_device)
  # seed-major: the whole suite for seed 0, then seed 1
  started = [m.split("] ", 1)[1].split(" (")[0] for m in logs if m.startswith("[sweep ")]
  assert started == ["dense seed 0: complete, skipped"] + [
      f"{n} seed {s}" for s in (0, 1) for n in names][1:], started
  for name in names:
    for seed in (0, 1):
      assert sweep.is_complete(sweep.run_dir(sweep_dir, name, seed))
  # the compression run started from the dense run of its own seed
  cfg = json.load(open(os.path.join(sweep.run_dir(sweep_dir, "ptq_int8", 1), "config.json")))
  assert cfg["init"] == sweep.run_dir(sweep_dir, "dense", 1) and cfg["seed"] == 1
  # rerunning skips every complete run (an interrupted sweep resumes this way)
  again = []
  sweep.run_all(names, 2, sweep_dir, True, procedural_dir, log=again.append,
                adjust=one_device)
  assert len(again) == 6 and all("complete, skipped" in m for m in again)
  # a run that fails is logged and the others still run (here: prune50's config made
  # invalid; it fails before it writes anything)
  def bad_prune(config):
    one_device(config)
    if "prune" in config.compress:
      config.compress.prune.sparsity = 1.5
  bad = []
  failed = sweep.run_all(["prune50"] + names, 1, sweep_dir, True, procedural_dir,
                         log=bad.append, adjust=bad_prune)
  assert [(n, s) for n, s, _ in failed] == [("prune50", 0)], bad
  assert "sparsity=1.5" in failed[0][2] and any("prune50 seed 0: FAILED" in m for m in bad)
  assert sum("complete, skipped" in m for m in bad) == 3
  assert not os.path.exists(sweep.run_dir(sweep_dir, "prune50", 0))

  out = sweep.report(names, 2, sweep_dir, log=lambda *_: None)
  rows = {r["name"]: r for r in out["methods"]}
  dense, ptq = rows["dense"], rows["ptq_int8"]
  accs = [r["accuracy"] for r in out["runs"] if r["name"] == "dense"]
  assert dense["seeds"] == 2 and dense["accuracy"] == pytest.approx(sum(accs) / 2)
  assert dense["accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
  assert ptq["ratio"] > 3.5 and ptq["bits"] == "8" and dense["ratio"] == pytest.approx(1.0)
  assert rows["only_image"]["baseline"] and rows["only_image"]["disk_bytes"] < dense["disk_bytes"]
  # one forward's FLOPs: a model without two of its towers costs less than dense
  assert dense["flops_ratio"] == pytest.approx(1.0) and rows["only_image"]["flops_ratio"] < 0.7
  # dense's throughput ratio comes from each run's own side-by-side timing (same model)
  side = [r["dense_forward_ms"] / r["forward_ms"] for r in out["runs"] if r["name"] == "dense"]
  assert dense["throughput_ratio"] == pytest.approx(sum(side) / len(side))
  md = open(os.path.join(sweep_dir, "results.md")).read()
  assert "| ptq_int8 | `ptq.py` |" in md and "(n=2)" in md
  for png in ("pareto.png", "pareto_flops.png"):
    with open(os.path.join(sweep_dir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # runs carried from an earlier publish join the report; runs trained here take precedence
  carried = [dict(r, name="prune90") for r in out["runs"] if r["name"] == "ptq_int8"] + [
      dict(r, accuracy=0.5) for r in out["runs"] if r["name"] == "dense" and r["seed"] == 0]
  path = tmp_path / "earlier.json"
  path.write_text(json.dumps({"runs": carried}))
  more = sweep.report(names, 2, sweep_dir, log=lambda *_: None,
                      carried=sweep.load_carry(str(path)))
  rows2 = {r["name"]: r for r in more["methods"]}
  assert rows2["prune90"]["seeds"] == 2 and rows2["dense"]["accuracy"] == dense["accuracy"]
  assert "2 runs carried" in more["meta"] and "dense seed 0 was retrained here" in more["meta"]
  path.write_text(json.dumps({"runs": [{"name": "prune42", "seed": 0}]}))
  with pytest.raises(ValueError, match="prune42"):
    sweep.load_carry(str(path))

  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{results.MARK_BEGIN}\nold table\n{results.MARK_END}\noutro\n")
  results.publish(sweep_dir, readme=str(readme), results_dir=str(tmp_path / "results"),
                log=lambda *_: None)
  text = readme.read_text()
  assert "old table" not in text and "| ptq_int8 |" in text and text.endswith("outro\n")
  assert "![accuracy against bytes on disk](results/pareto.png)" in text
  # another dataset's sweep publishes beside the suite, never over it
  readme.write_text(text + "<!-- sweep-results:real:begin -->\n<!-- sweep-results:real:end -->\n")
  results.publish(sweep_dir, readme=str(readme), results_dir=str(tmp_path / "results"),
                  log=lambda *_: None, dataset="mm_arith/real")
  again = readme.read_text()
  assert again.startswith(text) and again.count("| ptq_int8 |") == 2
  assert "(results/pareto_real.png)" in again
  assert (tmp_path / "results" / "results_real.json").exists()

  # the suite's targets are checked on its own dataset only: the same runs, marked as
  # trained on mm_arith/real, report no verdicts (its ceiling is lower)
  assert "runs on mm_arith/procedural (seeds 0, 1)" in out["meta"] and out["targets"]
  for name in names:
    for seed in (0, 1):
      path = os.path.join(sweep.run_dir(sweep_dir, name, seed), "config.json")
      config = json.load(open(path))
      config["data"]["dataset"] = "mm_arith/real"
      json.dump(config, open(path, "w"))
  real = sweep.report(names, 2, sweep_dir, log=lambda *_: None)
  assert real["targets"] == [] and "runs on mm_arith/real" in real["meta"]
  md = open(os.path.join(sweep_dir, "results.md")).read()
  assert "none is checked on mm_arith/real" in md and "| dense ≥ 95%" not in md


def _row(name, acc, std=0.0, ratio=1.0, seeds=3):
  return dict(name=name, accuracy=acc, accuracy_std=std, ratio=ratio, seeds=seeds)


def test_targets_give_verdicts_from_the_rows_and_say_what_has_not_run():
  from experiments import targets
  rows = [_row("dense", 0.99), _row("only_text", 0.11), _row("only_image", 0.25),
          _row("image+audio", 0.58), _row("prune90", 0.95, 0.004),
          _row("prune90_oneshot", 0.96, 0.01), _row("qat_int8", 0.985),
          _row("distill_student", 0.97, 0.004), _row("scratch_student", 0.965, 0.006),
          _row("combined", 0.97, 0.0, 18.5)]
  got = {t: (m, v) for t, m, v in targets.check(rows)}
  assert got["dense ≥ 95%"] == ("99.00%", True)
  assert got["only_text near chance (≤ 20%)"][1] is True
  assert got["only_image near chance (≤ 20%)"][1] is False
  assert got["only_audio near chance (≤ 20%)"] == ("not run", None)
  assert got["image+audio near its 60% ceiling (55–65%)"][1] is True
  assert got["90% gradual pruning ≥ 95% of dense"] == ("95.00% = 96.0% of dense", True)
  assert got["90% gradual pruning better than one-shot 90%"][1] is False
  assert got["int8 QAT ≥ 99% of dense"][1] is True            # 0.985 / 0.99 = 99.5%
  assert got["int8 PTQ ≥ 98% of dense"] == ("not run", None)
  # gap 0.5 points is below the larger std (0.6): not met
  assert got["distilled student beats the scratch student by more than the seed std"][1] is False
  assert got["combined pipeline ≥ 10× smaller than dense fp32 at ≥ 95% of dense"][1] is True
  # with one seed there is no std to beat: no verdict
  one = [dict(r, seeds=1) if r["name"].endswith("student") else r for r in rows]
  got1 = {t: (m, v) for t, m, v in targets.check(one)}
  assert got1["distilled student beats the scratch student by more than the seed std"] == (
      "97.00% vs 96.50%: gap 0.50 points (one seed: no std yet)", None)
  md = targets.table_md(targets.check(rows))
  assert "| only_image near chance (≤ 20%) | 25.00% | **missed** |" in md


def test_step_time_ratio_compares_each_run_with_the_dense_runs_of_its_origin():
  """Carried runs were timed on another machine: each run against its own origin's dense."""
  rec = lambda name, rate, origin: dict(name=name, config="x", accuracy=0.9, sparsity=0.0,
                                        bits="32", disk_bytes=100, steps_per_s=rate,
                                        wall_s=1.0, origin=origin)
  records = [rec("dense", 4.0, "here"), rec("m", 2.0, "here"), rec("m", 0.5, "before")]
  rows = {r["name"]: r for r in results.aggregate(records, dense_times=results.dense_step_times(
      [rec("dense", 4.0, "here"), rec("dense", 1.0, "before")]))}
  # here: 0.5 s / 0.25 s = 2; before: 2 s / 1 s = 2 (against the mixed mean it would differ)
  assert rows["m"]["step_time_ratio"] == pytest.approx(2.0)
  assert rows["dense"]["step_time_ratio"] == pytest.approx(1.0)
