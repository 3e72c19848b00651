"""Compression through the harness: each method runs from its config file, starting from a
dense run, writes its report, keeps its masks in the checkpoint; config errors come early."""
import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import nm, prune, qat
from experiments.configs import structured as structured_cfg
from mmjax.compress import flatten
from mmjax.harness import checkpointing, family, train
from mmjax.models.family import PRUNE_PATTERN
import re


def _quiet(*_):
  pass


@pytest.fixture
def dense_dir(tiny_dense_dir):
  return tiny_dense_dir


def _cfg(module, arg, data_dir, init):
  c = module.get_config(arg)
  c.data.data_dir = data_dir
  c.mesh.data = 1
  c.init = init
  return c


def _final_params(workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  state = ckpt.restore_local(ckpt.latest_step())
  ckpt.close()
  return state


def test_gradual_pruning_run_reaches_its_sparsity_and_reports_it(procedural_dir, dense_dir,
                                                                  tmp_path):
  workdir = str(tmp_path / "prune")
  logs = []
  train.train_and_evaluate(_cfg(prune, "tiny,sparsity=0.75", procedural_dir, dense_dir),
                           workdir, log=logs.append)
  assert any("[init] params from" in l for l in logs)
  report = json.load(open(os.path.join(workdir, "compression_report.json")))
  pruned = [r for r in report["leaves"] if re.fullmatch(PRUNE_PATTERN, r["path"])]
  assert pruned and all(r["masked"] for r in pruned)
  for r in pruned:  # realized, per layer, +-1 element (gradual ramp ended at step 22)
    assert abs(r["sparsity"] * r["size"] - 0.75 * r["size"]) <= 1, r
  assert report["dense_accuracy"] is not None and report["accuracy"] is not None
  assert any("TOTAL" in l for l in logs)
  # the master weights in the checkpoint are exactly zero where the saved masks say so
  state = _final_params(workdir)
  params = flatten(state["params"])
  masks = state["cstate"]["magnitude_layer_0.75"]["masks"]  # keyed by method name
  for path, mask in masks.items():
    assert (np.asarray(params[path])[~np.asarray(mask)] == 0).all()


def test_two_four_run(procedural_dir, dense_dir, tmp_path):
  """(Pruning + int8 QAT through the harness: test_train's resume-after-the-final-checkpoint
  test checks that run's report.)"""
  workdir = str(tmp_path / "nm")
  train.train_and_evaluate(_cfg(nm, "tiny", procedural_dir, dense_dir), workdir, log=_quiet)
  report = json.load(open(os.path.join(workdir, "compression_report.json")))
  k = {r["path"]: r for r in report["leaves"]}["image/block_00/mlp/fc1/kernel"]
  assert k["n_m"] == [2, 4] and abs(k["sparsity"] - 0.5) < 1e-9


def test_structured_run_writes_a_physically_smaller_model(procedural_dir, dense_dir, tmp_path):
  from experiments.configs import structured as structured_cfg
  from mmjax.models import MultimodalModel, random_inputs, structure
  workdir = str(tmp_path / "heads")
  c = _cfg(structured_cfg, "tiny,sparsity=0.5", procedural_dir, dense_dir)
  c.train.steps = 12
  train.train_and_evaluate(c, workdir, log=_quiet)
  report = json.load(open(os.path.join(workdir, "compression_report.json")))
  assert report["shrunk_model"]["num_heads"] == 1  # tiny has 2 heads
  small, cfg = structure.load_shrunk(report["shrunk_dir"])
  assert report["shrunk_parameters"] < report["total"]["size"]
  x = random_inputs(cfg, 2)
  logits, _ = MultimodalModel(cfg).apply({"params": small}, x)
  assert logits.shape == (2, 10)


def test_qat_tensor_granularity_reports_one_scale(dense_dir):
  """config -> plan -> report without training (the harness runs QAT in the tests above):
  `tensor` granularity computes with one 4-bit grid a leaf and stores one float32 scale."""
  from mmjax.compress import report
  from mmjax.harness import compress_config
  c = _cfg(qat, "tiny,bits=4,tensor", None, dense_dir)
  plan = compress_config.build(c, family.from_config(c)).plan
  params, cstate = plan.start(_final_params(dense_dir)["params"], jax.random.key(0))
  path = "text/token_embed/embedding"
  view = np.asarray(flatten(jax.jit(plan.view)(params, cstate))[path])
  assert len(np.unique(view)) <= 16  # one grid for the whole [vocab, d] table
  r = {x["path"]: x for x in report.build(params, plan, cstate)["leaves"]}[path]
  assert r["bits"] == 4 and r["compressed_bytes"] == int(np.ceil(r["size"] / 2)) + 4


@pytest.mark.parametrize("module, arg, override, needle", [
    (prune, "tiny,sparsity=1.0", None, r"sparsity=1.0 is outside \[0, 1\)"),
    (prune, "tiny", ("rules", (("vision/.*", 0.5),)), "matches no parameter"),
    (nm, "tiny,n=4,m=4", None, "1 <= n < m, got n=4, m=4"),
    (nm, "tiny,n=1,m=5", None, "not divisible by M"),
    (qat, "tiny,bits=9", None, r"bits=9 must be an integer in 2..8"),
    (prune, "tiny", ("method", "movement"),
     "method='movement' is not a registered compression method"),
    (prune, "tiny,sparsity=abc", None, "not a valid float"),
    (structured_cfg, "tiny,sparsity=0.9", None, "would remove every head"),
])
def test_bad_compression_configs_fail_before_anything_is_written(
    procedural_dir, dense_dir, tmp_path, module, arg, override, needle):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=needle):
    c = _cfg(module, arg, procedural_dir, dense_dir)
    if override:
      c.compress.prune[override[0]] = override[1]
    train.train_and_evaluate(c, str(workdir), log=_quiet)
  assert not workdir.exists()


def test_export_round_trip_and_sizes(tmp_path):
  """The export stores real codes: it loads back to the compressed view, and its bytes on
  disk shrink as the format says (int8 about 4x, 2:4 + int8 and 90% + int8 more)."""
  from mmjax.compress import Plan, bitpack, chain, export, pruning, quant, rules
  r = np.random.default_rng(0)
  params = {"l0": {"kernel": r.normal(size=(256, 512)).astype(np.float32),
                   "bias": r.normal(size=(512,)).astype(np.float32)},
            "l1": {"kernel": r.normal(size=(512, 256)).astype(np.float32)}}
  paths = list(flatten(params))
  q8 = rules([(r".*kernel", quant.weights(8))], paths)
  q4 = rules([(r".*kernel", quant.weights(4, "tensor"))], paths)
  nm24 = rules([(r".*kernel", pruning.n_of_m(2, 4))], paths)
  p90 = rules([(r".*kernel", pruning.unstructured(0.9))], paths)
  dense_bytes = None
  sizes = {}
  raw = str(tmp_path / "dense_raw")
  export.export(params, raw, zstd=False)
  assert abs(export.disk_bytes(raw) - 4 * sum(a.size for a in flatten(params).values())) < 4096
  for name, t in (("dense", None), ("int8", q8), ("int4", q4), ("2:4+int8", chain(nm24, q8)),
                  ("90%+int8", chain(p90, q8)), ("90%", p90)):
    plan = Plan(*t) if isinstance(t, tuple) else (Plan(t) if t else None)
    started, cstate = plan.start(params, jax.random.PRNGKey(0)) if plan else (params, None)
    out = str(tmp_path / name.replace("%", "").replace(":", "_").replace("+", "_"))
    export.export(started, out, plan, cstate)
    sizes[name] = export.disk_bytes(out)
    loaded = flatten(export.load(out))
    view = flatten(plan.view(started, cstate)) if plan else flatten(params)
    for k in view:
      np.testing.assert_allclose(loaded[k], np.asarray(view[k]), rtol=1e-6, atol=1e-7)
    if name in ("int8", "2:4+int8"):  # QAT's codes are grid codes: 8-bit, a scale a column
      c = export.load_grid_codes(out)["l0/kernel"]
      assert (c["grid"].kind, c["grid"].bits, c["grid"].symmetric) == ("int", 8, True)
      assert c["scale"].shape == (1, 512) and c["packed"].dtype == np.uint8
      codes = bitpack.unpack(c["packed"], c["count"], 8).astype(np.int16) - 128
      kept = np.asarray(view[k := "l0/kernel"]).reshape(-1)
      kept = kept[c["mask"]] if c["mask"] is not None else kept
      scale = np.broadcast_to(c["scale"], (256, 512)).reshape(-1)
      scale = scale[c["mask"]] if c["mask"] is not None else scale
      assert np.abs(codes).max() <= 127
      np.testing.assert_array_equal(codes, np.round(kept.astype(np.float64) / scale))
  ratios = {k: export.disk_bytes(raw) / v for k, v in sizes.items()}
  zstd_ratios = {k: sizes["dense"] / v for k, v in sizes.items()}
  # against raw fp32 (4 bytes a parameter) the targets hold: int8 >= 3.9, 2:4 +
  # int8 >= 6, 90% + int8 >= 15. Against zstd'd fp32 (Gaussian weights shrink ~7%, their int8
  # codes ~6%) each sits a little lower; trained models: bench/compress_overhead.py.
  assert ratios["int8"] > 3.9 and ratios["int4"] > 7.5
  assert ratios["2:4+int8"] > 6.0 and ratios["90%+int8"] > 15.0 and ratios["90%"] > 6.0
  assert zstd_ratios["int8"] > 3.8 and zstd_ratios["2:4+int8"] > 5.8


def test_export_refuses_a_directory_that_is_not_an_export(tmp_path):
  from mmjax.compress import export
  with pytest.raises(ValueError, match="not an mmjax export"):
    export.load(str(tmp_path))


def test_distillation_student(procedural_dir, dense_dir, tmp_path):
  from experiments.configs import distill
  # a smaller student (d_model 16 vs the teacher's 32): the feature projection is learned;
  # with the fusion attention-map term (the student's one fusion layer, the teacher's one)
  c = distill.get_config("tiny,attention=1.0")
  c.data.data_dir, c.mesh.data = procedural_dir, 1
  c.compress.distill.teacher = dense_dir
  logs = []
  workdir = str(tmp_path / "student")
  train.train_and_evaluate(c, workdir, log=logs.append)
  assert any("[distill] teacher from" in l for l in logs)
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  kl = [r["train/distill_kl"] for r in records if "train/distill_kl" in r]
  assert len(kl) >= 2 and all(np.isfinite(kl))
  assert all("train/distill_feature_mse" in r for r in records if "train/loss" in r)
  att = [r["train/distill_attention_kl"] for r in records if "train/loss" in r]
  assert len(att) >= 2 and all(np.isfinite(att)) and att[0] > 0
  state = _final_params(workdir)
  # the projection (student 16 -> teacher 32 wide) is a trainable parameter, and nothing
  # of the teacher is saved: the state holds the student's parameters and that alone
  proj = state["aux"]["distill"]["pooled"]["kernel"]
  assert set(state) == {"step", "params", "aux", "opt_state", "cstate", "rng"}
  assert np.asarray(proj).shape == (48, 96)
  n_student = sum(np.size(x) for x in jax.tree.leaves(state["params"]))
  assert n_student == json.load(open(os.path.join(workdir, "summary.json")))["parameters"]
  teacher_n = json.load(open(os.path.join(dense_dir, "summary.json")))["parameters"]
  n_saved = sum(np.size(x) for x in jax.tree.leaves((state["params"], state["aux"])))
  assert n_saved == n_student + 48 * 96 + 96 and n_saved < teacher_n
  # the combined pipeline (self-distillation + pruning + int8, exported): test_quickstart


def test_distillation_loss_is_zero_when_student_equals_teacher():
  import jax.numpy as jnp
  from mmjax.compress import Forward, distill
  from mmjax.models import MultimodalModel, get_preset, random_inputs
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 10)), jnp.float32)
  w = jnp.ones((6,))
  assert float(distill.kl_soft(logits, logits, 2.0, w)) == pytest.approx(0.0, abs=1e-6)
  assert float(distill.kl_soft(logits, logits[::-1], 2.0, w)) > 0.1
  cfg = get_preset("tiny")
  model = MultimodalModel(cfg)
  x = random_inputs(cfg, 4)
  x["example_mask"] = np.ones(4, bool)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  params = {**params, "head": {**params["head"], "kernel": jnp.ones_like(
      params["head"]["kernel"])}}
  d = distill.method(lambda p, b: model.apply({"params": p}, b), temperature=3.0, alpha=1.0,
                     features=("pooled", "image/final"), feature_weight=1.0)
  out, inter = model.apply({"params": params}, x)
  fwd = Forward(out, inter, x, frozen=params)
  proj = d.init_params(fwd, jax.random.PRNGKey(1))
  total, m = d.loss(fwd._replace(params=proj), {})
  assert proj == {} and d.task_weight == 0.0
  assert float(total) == pytest.approx(0.0, abs=1e-6) and "distill_feature_mse" in m
  other = jax.tree.map(lambda a: a * 1.5, params)  # a different student: a positive loss
  out2, inter2 = model.apply({"params": other}, x)
  assert float(d.loss(Forward(out2, inter2, x, frozen=params), {})[0]) > 1e-4


@pytest.mark.parametrize("field, value, needle", [
    ("teacher", "", "distill.teacher is not set"),
    ("teacher", "/nonexistent/run", "no config.json"),
    ("alpha", 1.5, r"alpha=1.5 must be in \[0, 1\]"),
    ("temperature", 0.0, "temperature=0.0 must be > 0"),
    ("attention_weight", -1.0, r"attention_weight=-1.0 must be >= 0"),
])
def test_bad_distillation_configs(procedural_dir, dense_dir, tmp_path, field, value, needle):
  from experiments.configs import distill
  c = distill.get_config("tiny")
  c.data.data_dir, c.mesh.data = procedural_dir, 1
  c.compress.distill.teacher = dense_dir
  c.compress.distill[field] = value
  with pytest.raises(ValueError, match=needle):
    train.train_and_evaluate(c, str(tmp_path / "w"), log=_quiet)
  assert not (tmp_path / "w").exists()


def test_teacher_that_does_not_fit_its_config(procedural_dir, dense_dir, tmp_path):
  from experiments.configs import distill
  from mmjax.harness.checkpointing import CheckpointMismatchError
  c = distill.get_config("tiny")
  c.data.data_dir, c.mesh.data = procedural_dir, 1
  c.compress.distill.teacher = dense_dir
  model = json.load(open(os.path.join(dense_dir, "config.json")))["model"]
  model["d_model"] = 64
  import ml_collections
  c.compress.distill.teacher_model = ml_collections.ConfigDict(model)
  with pytest.raises(CheckpointMismatchError, match="the teacher"):
    train.train_and_evaluate(c, str(tmp_path / "w"), log=_quiet)
  assert not (tmp_path / "w").exists()


def test_ptq_fake_quant_and_integer_paths_agree(procedural_dir, dense_dir, tmp_path):
  """Post-training int8 without training, fake-quant and on the integer path. (int8 W8A8 QAT
  trains through the harness in test_any_model; test_lowering lowers its step for GPU/TPU.)"""
  from experiments.configs import ptq
  dense_acc = json.load(open(os.path.join(dense_dir, "summary.json")))["eval_accuracy"]
  accs = {}
  for arg in ("tiny", "tiny,int8"):
    workdir = str(tmp_path / arg.replace(",", "_"))
    logs = []
    summary = train.train_and_evaluate(_cfg(ptq, arg, procedural_dir, dense_dir), workdir,
                                       log=logs.append)
    assert summary["step"] == 0 and any("calibrated" in l for l in logs)
    report = json.load(open(os.path.join(workdir, "compression_report.json")))
    assert report["activations"]["layers"] > 10 and report["disk_ratio"] > 3.0
    accs[arg] = summary["eval_accuracy"]
  # the integer path computes what fake-quant computes: the same predictions (up to ties)
  assert abs(accs["tiny"] - accs["tiny,int8"]) <= 0.002
  assert abs(accs["tiny"] - dense_acc) <= 0.05


def test_post_training_one_shot_runs(procedural_dir, dense_dir, tmp_path):
  """SparseGPT 2:4 + 4-bit, calibrated and exported, no training (GPTQ runs through the
  harness in test_post_training_suite's allocation row)."""
  from experiments.configs import post_training
  for arg in ("tiny,method=sparsegpt,nm=2:4,joint,parallel",):
    workdir = str(tmp_path / arg.replace(",", "_").replace(":", ""))
    logs = []
    summary = train.train_and_evaluate(_cfg(post_training, arg, procedural_dir, dense_dir),
                                       workdir, log=logs.append)
    assert summary["step"] == 0 and np.isfinite(summary["eval_loss"])
    assert any("calibrated" in l and "128 examples" in l for l in logs), logs
    report = json.load(open(os.path.join(workdir, "compression_report.json")))
    blocks = [r for r in report["leaves"] if "/block_" in r["path"] and
              r["path"].endswith("kernel")]
    assert blocks and all(r["bits"] == (3 if "gptq" in arg else 4) for r in blocks)
    if "sparsegpt" in arg:
      assert all(abs(r["sparsity"] - 0.5) < 0.01 and r["n_m"] == [2, 4] for r in blocks)
    assert report["post_training"]["method"] in arg and report["calibration"]["examples"] == 128
    assert os.path.isdir(os.path.join(workdir, "export"))


@pytest.mark.parametrize("examples, needle", [(10 ** 7, "exceeds the"),
                                              (100, "not a multiple of")])
def test_bad_calibration_size_fails_before_any_work(procedural_dir, dense_dir, tmp_path,
                                                    examples, needle):
  from experiments.configs import post_training
  c = _cfg(post_training, "tiny", procedural_dir, dense_dir)
  c.calibration.examples = examples
  with pytest.raises(ValueError, match=needle):
    train.train_and_evaluate(c, str(tmp_path / "w"), log=_quiet)
  assert not (tmp_path / "w").exists()


def test_readme_user_transform_runs_through_the_harness(procedural_dir, tmp_path):
  """The README's "How to add a transform" example, on the tiny config."""
  import jax.numpy as jnp
  from experiments.configs import dense
  from mmjax.compress import Method, Plan, rules

  def grid(step_size):
    def view(flat, state):  # what the model computes with; straight-through gradient
      return {p: w + jax.lax.stop_gradient(jnp.round(w / step_size) * step_size - w)
              for p, w in flat.items()}
    return Method(f"grid{step_size}", view=view)

  config = dense.get_config("tiny")
  config.data.data_dir, config.mesh.data, config.train.steps = procedural_dir, 1, 4
  paths = family.from_config(config).param_shapes()
  plan = Plan(rules([(r".*/mlp/.*/kernel", grid(0.01))], list(paths)))
  workdir = str(tmp_path / "grid")
  train.train_and_evaluate(config, workdir, plan=plan, log=_quiet)
  report = json.load(open(os.path.join(workdir, "compression_report.json")))
  assert "grid0.01" in report["plan"]
  from mmjax.compress import export
  w = flatten(export.load(os.path.join(workdir, "export")))["image/block_00/mlp/fc1/kernel"]
  np.testing.assert_allclose(w, np.round(w / 0.01) * 0.01, atol=1e-6)


def test_attention_distillation_between_layers_that_cannot_pair(procedural_dir, dense_dir,
                                                                 tmp_path):
  from experiments.configs import distill
  c = distill.get_config("tiny,attention=1.0")
  c.data.data_dir, c.mesh.data = procedural_dir, 1
  c.compress.distill.teacher = dense_dir
  c.model.fusion.num_layers = 2  # the teacher has 1
  with pytest.raises(ValueError, match=r"the student's fusion layers \['layer_00', "
                     r"'layer_01'\] cannot be paired with the teacher's \['layer_00'\]"):
    train.train_and_evaluate(c, str(tmp_path / "w"), log=_quiet)
  assert not (tmp_path / "w").exists()
