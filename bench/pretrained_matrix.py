"""Every compression method on every pretrained family, by config alone, offline: the
golden checkpoints of tests/golden (Hugging Face's files, small random weights) through
experiments/configs/pretrained.py on TFDS mock data (mm_arith's real audio for Whisper).
A coverage check, not a speed figure: each cell is one run (`tiny`), reported with its
accuracy, how many kernels it compressed and with what; then, per family, the GPTQ run's
deploy artifact against the compressed model in process (largest logit difference) and
per-tower sensitivity.

  python -m bench.pretrained_matrix [--only=clip,vit] [--out=bench/results/pretrained_matrix.json]

The test suite runs a slice of this matrix (tests/test_pretrained_runs.py).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")
FAMILIES = {"vit": "cifar10", "clip": "cifar10", "siglip": "cifar10",
            "bert": "imdb_reviews", "whisper": "mm_arith/procedural"}
METHODS = {
    "gptq w4": "method=gptq,bits=4",
    "awq w4": "method=awq,bits=4",
    "rtn w8a8 int8": "method=rtn,bits=8,group=0,w8a8,int8",
    "smoothquant int8": "method=smoothquant,int8",
    "sparsegpt 2:4": "method=sparsegpt,nm=2:4",
    "wanda 50%": "method=wanda,sparsity=0.5",
    "magnitude 2:4": "method=magnitude,nm=2:4",
    "prune 2:4 (train)": "method=prune,nm=2:4,steps=2",
    "qat w4 (train)": "method=qat,bits=4,steps=2",
    "qat w8a8 int8 (train)": "method=qat,bits=8,int8,steps=2",
}


def _run(family, arg, workdir, data_dir):
  from experiments.configs import pretrained
  from mmjax.harness import train
  c = pretrained.get_config(f"model={family},checkpoint={os.path.join(GOLDEN, family)},"
                            f"dataset={FAMILIES[family]},tiny" + (f",{arg}" if arg else ""))
  c.data.data_dir, c.data.download, c.mesh.data = data_dir, True, 1
  if family == "whisper":
    c.data.audio_samples = 2400  # the golden encoder's 8 positions
  return train.train_and_evaluate(c, workdir, log=lambda *_: None)


def _leaves(workdir):
  with open(os.path.join(workdir, "compression_report.json")) as f:
    rep = json.load(f)
  done = [d for d in rep["leaves"] if (d.get("bits", 32) < 32 or d.get("sparsity", 0) > 0)
          and not d["path"].startswith("head/")]
  bits = sorted({d.get("bits", 32) for d in done})
  sparsity = sorted({round(d.get("sparsity", 0.0), 3) for d in done})
  return len(done), bits, sparsity


def _deploy_diff(workdir, out):
  import jax
  import ml_collections
  import numpy as np
  from mmjax.cli import deploy
  from mmjax.compress import export
  from mmjax.harness import family as family_lib, run_setup
  deploy.build(workdir, out, platforms=("cpu",), log=lambda *_: None)
  spec = importlib.util.spec_from_file_location("artifact_serve", os.path.join(out, "serve.py"))
  serve = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(serve)
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  fam = family_lib.from_config(config)
  batch = fam.example_batch(8, run_setup.input_config(config, fam), with_labels=False)
  want = np.asarray(jax.jit(fam.apply)(export.load(os.path.join(workdir, "export")), batch)[0])
  got = np.asarray(serve.load(out)(batch))
  return float(np.abs(got - want).max())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", default=",".join(FAMILIES))
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results",
                                                     "pretrained_matrix.json"))
  flags = parser.parse_args()
  import tensorflow_datasets as tfds
  from mmjax.data import sources
  tmp = tempfile.mkdtemp(prefix="pretrained-matrix-")
  mm = os.path.join(tmp, "mm_arith")
  sources.prepare("mm_arith/procedural", mm, num_train=256, num_test=128, log=lambda *_: None)
  rows = []
  for family in flags.only.split(","):
    data = mm if FAMILIES[family].startswith("mm_arith") else os.path.join(tmp, "tfds")
    mock = (contextlib.nullcontext() if FAMILIES[family].startswith("mm_arith")
            else tfds.testing.mock_data(num_examples=32))
    with mock:
      dense = os.path.join(tmp, f"{family}-dense")
      t0 = time.perf_counter()
      out = _run(family, "", dense, data)
      from experiments import sensitivity
      sens = sensitivity.run(dense, dense + "-sensitivity", settings=("w2c", "w8c"),
                             budgets=("w8c",), data_dir=data, calib_examples=16,
                             val_examples=32, log=lambda *_: None)
      rows.append(dict(family=family, method="dense + sensitivity", ok=True,
                       accuracy=out["eval_accuracy"], towers=sorted(sens["towers"]),
                       kernels=len(sens["layers"]), seconds=round(time.perf_counter() - t0, 1)))
      print(f"{family:8s} dense {out['eval_accuracy']:.3f}; sensitivity: "
            f"{len(sens['layers'])} kernels, towers {sorted(sens['towers'])} "
            f"({rows[-1]['seconds']} s)", flush=True)
      for name, arg in METHODS.items():
        workdir = os.path.join(tmp, f"{family}-{name.replace(' ', '_')}")
        t0 = time.perf_counter()
        row = dict(family=family, method=name, arg=arg)
        try:
          out = _run(family, arg, workdir, data)
          n, bits, sparsity = _leaves(workdir)
          row.update(ok=True, accuracy=out["eval_accuracy"], kernels=n, bits=bits,
                     sparsity=sparsity)
          if name == "gptq w4":
            row["deploy_max_logit_diff"] = _deploy_diff(workdir, workdir + "-artifact")
        except Exception as e:  # noqa: BLE001 (a cell that fails is reported, not fatal)
          row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
          traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{family:8s} {name:24s} " + (
            f"ok   acc {row['accuracy']:.3f}  {row['kernels']:3d} kernels  bits {row['bits']}"
            f"  sparsity {row['sparsity']}"
            + (f"  deploy max|diff| {row['deploy_max_logit_diff']:.1e}"
               if "deploy_max_logit_diff" in row else "")
            if row["ok"] else f"FAILED {row['error']}") + f"  ({row['seconds']} s)",
            flush=True)
  os.makedirs(os.path.dirname(flags.out), exist_ok=True)
  with open(flags.out, "w") as f:
    json.dump(rows, f, indent=1)
  failed = [r for r in rows if not r["ok"]]
  print(f"{len(rows) - len(failed)}/{len(rows)} runs ok; written {flags.out}")
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
