"""experiments/configs/pretrained.py end to end, offline: the golden checkpoints (random
weights, Hugging Face's files: safetensors, config.json, tokenizer, image processor) on
TFDS mock data, by config alone. CLIP as a zero-shot classifier of cifar10's class names:
dense evaluation, GPTQ, its deploy artifact (scoring as the run) and per-tower
sensitivity; then every method on some family, and every family under some method
(Whisper's with its deploy artifact, the log-mel front end inside it). BERT and Whisper
also fine-tune (QAT, pruning) for a few steps."""
import contextlib
import json
import os

import pytest
import tensorflow_datasets as tfds

from experiments.configs import pretrained
from mmjax.cli import deploy
from mmjax.harness import train

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
QUIET = lambda *_: None


def _run(arg, workdir, data_dir, **data):
  c = pretrained.get_config(f"{arg},tiny")
  c.data.update(dict(data_dir=data_dir, download=True, **data))  # download: mock data's
  c.mesh.data = 1
  return train.train_and_evaluate(c, workdir, log=QUIET)


def _report(workdir):
  with open(os.path.join(workdir, "compression_report.json")) as f:
    return json.load(f)


def test_clip_zero_shot_dense_gptq_deploy_and_sensitivity(tmp_path):
  ckpt = os.path.join(GOLDEN, "clip")
  data = str(tmp_path / "data")
  with tfds.testing.mock_data(num_examples=48):
    dense = str(tmp_path / "dense")
    out = _run(f"model=clip,checkpoint={ckpt}", dense, data)
    assert out["step"] == 0 and out["eval_examples"] == 48
    with open(os.path.join(dense, "config.json")) as f:  # read when the run starts
      assert json.load(f)["model"]["class_names"] == "<dataset:label_names>"

    gptq = str(tmp_path / "gptq")
    out = _run(f"model=clip,checkpoint={ckpt},method=gptq,bits=4", gptq, data)
    rep = _report(gptq)
    four = sorted(d["path"] for d in rep["leaves"] if d["bits"] == 4)
    assert len(four) == 24 and {p.split("/")[0] for p in four} == {"image", "text"}
    assert rep["accuracy"] == out["eval_accuracy"]

    art = str(tmp_path / "artifact")  # the prompts' text tower is inside the program
    res = deploy.build(gptq, art, platforms=("cpu",), log=QUIET)
    assert res["manifest"]["modalities"] == ["image"]
    from mmjax.data import sources  # (mock data's metadata names cifar10's classes 0-9)
    assert res["manifest"]["labels"] == list(sources.label_names("cifar10", data))
    ev = deploy.evaluate(gptq, art, data_dir=data, log=QUIET)
    assert ev["accuracy"] == pytest.approx(out["eval_accuracy"], abs=1.5 / 48)
    # its logits are the compressed model's in process (the export's weights in mmjax's)
    import importlib.util

    import jax
    import numpy as np
    from mmjax.compress import export
    from mmjax.harness import family as family_lib
    spec = importlib.util.spec_from_file_location("clip_serve", os.path.join(art, "serve.py"))
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    with open(os.path.join(gptq, "config.json")) as f:
      fam = family_lib.from_config(__import__("ml_collections").ConfigDict(json.load(f)))
    images = fam.example_batch(8, with_labels=False)
    want = np.asarray(jax.jit(fam.apply)(export.load(os.path.join(gptq, "export")), images)[0])
    got = np.asarray(serve.load(art)(images))
    assert got.shape == (8, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    from experiments import sensitivity
    sens = sensitivity.run(dense, str(tmp_path / "sens"), method="gptq",
                           settings=("w2c", "w8c"), budgets=("w8c",), data_dir=data,
                           calib_examples=16, val_examples=32, log=QUIET)
    assert sorted(sens["towers"]) == ["image", "text"] and len(sens["layers"]) == 24


# every method on some family, every family under some method (the matmuls each family
# compresses by default: Family.patterns)
RUNS = [
    ("siglip", "method=awq,bits=4,w8a8", "cifar10", {"bits": 4}, True),
    ("siglip", "method=smoothquant,int8", "cifar10", {"bits": 8}, True),
    ("vit", "method=sparsegpt,nm=2:4", "cifar10", {"sparsity": 0.5}, False),
    ("vit", "task=probe,steps=3", "cifar10", {}, False),
    ("bert", "method=wanda,sparsity=0.5", "imdb_reviews", {"sparsity": 0.5}, False),
    ("bert", "method=qat,bits=4,steps=2", "imdb_reviews", {"bits": 4}, False),
    ("whisper", "method=prune,nm=2:4,steps=2", "mm_arith/procedural", {"sparsity": 0.5},
     False),
    ("clip", "method=rtn,bits=8,w8a8,int8", "cifar10", {"bits": 8}, True),
    ("clip", "task=retrieval,method=wanda,sparsity=0.5", "mm_arith/procedural",
     {"sparsity": 0.5}, True),
]


@pytest.mark.parametrize("family,arg,dataset,want,two_towers", RUNS,
                         ids=[f"{r[0]}-{r[1]}" for r in RUNS])
def test_every_method_and_family_by_config(family, arg, dataset, want, two_towers, tmp_path,
                                           procedural_dir):
  ckpt = os.path.join(GOLDEN, family)
  extra = {"audio_samples": 2400} if family == "whisper" else {}
  data = procedural_dir if dataset.startswith("mm_arith") else str(tmp_path / "data")
  workdir = str(tmp_path / "run")
  mock = contextlib.nullcontext() if dataset.startswith("mm_arith") else (
      tfds.testing.mock_data(num_examples=32))  # (mm_arith is offline: the real thing)
  with mock:
    out = _run(f"model={family},checkpoint={ckpt},dataset={dataset},{arg}", workdir, data,
               **extra)
  metric = "recall@1" if "retrieval" in arg else "accuracy"
  assert 0.0 <= out[f"eval_{metric}"] <= 1.0
  if "probe" in arg:  # only the new head moved
    import numpy as np
    from mmjax.compress import flatten
    from mmjax.harness import checkpointing
    from mmjax.harness import family as family_lib
    with open(os.path.join(workdir, "config.json")) as f:
      config = __import__("ml_collections").ConfigDict(json.load(f))
    with tfds.testing.mock_data(num_examples=32):
      fam = family_lib.from_config(config)
    loaded = flatten(fam.load(os.path.join(ckpt, "model.safetensors"), fam.abstract_params()))
    step = checkpointing.require_checkpoint(workdir, "probe")
    trained = flatten(checkpointing.restore_params_from(workdir, fam.abstract_params(), step))
    moved = sorted(p for p in loaded if not np.array_equal(loaded[p], trained[p]))
    assert moved == ["head/bias", "head/kernel"]
    return
  rep = _report(workdir)
  leaves = [d for d in rep["leaves"] if (d.get("bits", 32) < 32 or d.get("sparsity", 0) > 0)
            and not d["path"].startswith("head/")]  # (a new head starts at zero)
  assert leaves
  for k, v in want.items():
    off = [(d["path"], d[k]) for d in leaves if d[k] != pytest.approx(v)]
    assert not off, (k, off)
  towers = {d["path"].split("/")[0].split("_")[0] for d in leaves}  # (image_head: image)
  assert towers == ({"image", "text"} if two_towers else towers)
  if family == "whisper":  # the exported program holds the log-mel front end
    art = str(tmp_path / "artifact")
    res = deploy.build(workdir, art, platforms=("cpu",), log=QUIET)
    assert res["manifest"]["modalities"] == ["audio"]
    ev = deploy.evaluate(workdir, art, data_dir=data, log=QUIET)
    assert ev["accuracy"] == pytest.approx(out["eval_accuracy"], abs=1.5 / 256)
