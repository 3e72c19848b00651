"""Deployable artifacts (`compress/artifact.py`, `compress/serve.py`) of models mmjax did
not write: the artifact, loaded by its own serve.py, returns the in-process compressed
model's outputs for batch sizes 1, 3 and 16 from one program; serve.py runs with neither
mmjax nor Flax imported, and in an interpreter that sees only jax's own packages and
flatbuffers (without flatbuffers: one line saying what to install); damaged artifacts and
bad batches give one-line errors."""
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import Plan, activations, artifact, export, formats, layout, pruning, quant
from mmjax.compress import rules
from mmjax.compress.post_training import gptq, sparsegpt
from test_foreign_models import DIM, _task, linen_model, plain_model


def _serve(directory):
  spec = importlib.util.spec_from_file_location("serve_under_test",
                                                os.path.join(directory, "serve.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _write(tmp_path, name, params, apply, plan, cstate, like=None):
  exp_dir, out = str(tmp_path / f"{name}_export"), str(tmp_path / name)
  export.export(params, exp_dir, plan, cstate)
  bufs, meta = artifact.weights_from_export(exp_dir)
  named = lambda p, inputs: apply(p, inputs["x"])  # an artifact's inputs are named
  manifest = artifact.write(out, named, bufs, meta, {"x": np.zeros((2, DIM), np.float32)},
                            platforms=("cpu",), like=like)
  return out, manifest, exp_dir


def _check_batches(out, reference):
  model = _serve(out).load(out)
  x, _ = _task(16, seed=5)
  for n in (1, 3, 16):
    got = np.asarray(model({"x": np.asarray(x[:n]), "label": np.zeros(n)}))
    np.testing.assert_allclose(got, np.asarray(reference(x[:n])), rtol=1e-5, atol=1e-5)
  return model


def test_pruned_int8_and_4bit_leaves_with_integer_products(tmp_path):
  """50% pruned int8 weights with int8 x int8 -> int32 products (computed from the stored
  codes), 4-bit bit-packed weights with int8 inputs, a 2:4 + int8 leaf, fp32 biases."""
  params, apply = plain_model()
  plan = Plan(rules([(r"w1", pruning.unstructured(0.5)), (r"out/w", pruning.n_of_m(2, 4))]),
              rules([(r"w1|out/w", quant.weights(8)), (r"w2", quant.weights(4))]),
              rules([(r"w1|w2", activations.inputs(8, mode="int8"))]))
  p, cs = plan.start(params, jax.random.PRNGKey(0))
  x, _ = _task(64)
  p, cs = plan.calibrate(apply, p, cs, [x[:32], x[32:]])
  out, manifest, exp_dir = _write(tmp_path, "int8", p, apply, plan, cs)
  _check_batches(out, plan.apply(apply, p, cs))
  # the integer products read the stored codes: no float weight of w1 enters them
  hlo = jax.jit(artifact.forward(apply, artifact.weights_from_export(exp_dir)[1])).lower(
      artifact.weights_from_export(exp_dir)[0], x[:3]).as_text()
  assert re.search(r"\(tensor<3x16xi8>, tensor<16x64xi8>\) -> tensor<3x64xi32>", hlo), hlo
  # the artifact ships the export's bytes, not a dense copy
  weights = manifest["files"]["weights.npz"]["bytes"]
  assert weights < export.disk_bytes(exp_dir) + 4096
  assert manifest["inputs"] == {"x": {"shape": ["batch", DIM], "dtype": "float32"}}


def test_post_training_grids_on_a_linen_vit(tmp_path):
  """GPTQ 4-bit g16 on Flax's 3-D attention kernels, SparseGPT 2:4 joint with 4-bit on
  the MLP: grid codes two per byte, group scales, packed masks, rebuilt in the program."""
  params, apply = linen_model()
  g4 = formats.grid("int", 4, granularity="group", group_size=16, symmetric=False)
  plan = Plan(rules([(r"attn/.*kernel", gptq.method(g4, contract=layout.FLAX_ATTENTION)),
                     (r"fc\d/kernel", sparsegpt.method(n_m=(2, 4), grid=g4))]))
  x, _ = _task(128, seed=3)
  p, cs = plan.start(params, jax.random.PRNGKey(0))
  p, cs = plan.calibrate(apply, p, cs, [x[:64], x[64:]])
  out, manifest, _ = _write(tmp_path, "grid", p, apply, plan, cs, like=params)
  model = _check_batches(out, plan.apply(apply, p, cs))
  assert model.manifest["platforms"] == ["cpu"]


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
  """-> (artifact directory, the in-process compressed forward): int8 weights, plain model."""
  params, apply = plain_model()
  plan = Plan(rules([(r"w\d", quant.weights(8))]))
  p, cs = plan.start(params, jax.random.PRNGKey(0))
  out, _, _ = _write(tmp_path_factory.mktemp("int8"), "art", p, apply, plan, cs)
  return out, plan.apply(apply, p, cs)


def _bare_site(directory, flatbuffers: bool) -> str:
  """A directory of symlinks into this venv holding jax and what its metadata requires
  (jaxlib, numpy, scipy, ml_dtypes, opt_einsum...), plus flatbuffers if asked: what `pip
  install jax numpy [flatbuffers]` gives, nothing else."""
  dists, todo = set(), ["jax"] + (["flatbuffers"] if flatbuffers else [])
  while todo:
    d = todo.pop()
    if d not in dists:
      dists.add(d)
      todo += [re.match(r"[\w.-]+", r).group(0)
               for r in importlib.metadata.requires(d) or [] if "extra ==" not in r]
  os.makedirs(directory)
  for d in dists:
    dist = importlib.metadata.distribution(d)
    for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
      os.symlink(dist.locate_file(top), os.path.join(directory, top))
  return str(directory)


def _bare_python(site, *args, cwd):
  """`python -S` (no site-packages) seeing only `site`."""
  return subprocess.run([sys.executable, "-S", *args], cwd=cwd, capture_output=True,
                        text=True, env={**os.environ, "PYTHONPATH": site}, timeout=300)


def test_serve_runs_with_jax_numpy_flatbuffers_alone(int8_artifact, tmp_path):
  out, reference = int8_artifact
  x = np.asarray(_task(5, seed=7)[0])
  np.savez(tmp_path / "batch.npz", x=x)
  # with flatbuffers: the artifact's outputs are the in-process model's
  site = _bare_site(tmp_path / "site", flatbuffers=True)
  code = textwrap.dedent("""
      import importlib, sys
      import jax, numpy as np, serve
      assert jax.__file__.startswith(sys.argv[1]), jax.__file__  # jax from the bare site
      model = serve.load(".")
      np.save(sys.argv[2], np.asarray(model(dict(np.load(sys.argv[3])))))
      for name in ("flax", "mmjax", "optax"):
        try:
          importlib.import_module(name)
          print("imported", name)
        except ModuleNotFoundError:
          print("no", name)
      """)
  r = _bare_python(site, "-c", code, site, str(tmp_path / "y.npy"), str(tmp_path / "batch.npz"),
                   cwd=out)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["no", "flax", "no", "mmjax", "no", "optax"], r.stdout
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(reference(x)),
                             rtol=1e-6, atol=1e-6)
  # without flatbuffers: one line naming what to install, before anything is read
  site = _bare_site(tmp_path / "site_nofb", flatbuffers=False)
  for args in (["serve.py", out], ["-c", "import serve"]):
    r = _bare_python(site, *args, cwd=out)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.endswith("pip install jax numpy flatbuffers"), r.stderr
    assert "needs flatbuffers" in last and not r.stdout
  assert len(r.stderr.strip().splitlines()) > 1  # import: a traceback ending in that line
  r = _bare_python(site, "serve.py", out, cwd=out)
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # the command: that line alone


def test_serve_needs_only_jax_and_refuses_bad_input(int8_artifact, tmp_path):
  out = shutil.copytree(int8_artifact[0], tmp_path / "art")  # damaged below: a copy
  # a fresh interpreter, run from the artifact directory alone
  code = ("import sys, serve, numpy as np; m = serve.load('.'); "
          "y = m({'x': np.ones((5, %d), np.float32)}); "
          "bad = [k for k in sys.modules if k.split('.')[0] in ('mmjax', 'flax', 'optax')]; "
          "assert not bad, bad; print(np.asarray(y).shape)" % DIM)
  r = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True,
                     env={**os.environ, "PYTHONPATH": ""}, timeout=300)
  assert r.returncode == 0 and "(5, 4)" in r.stdout, r.stderr[-2000:]

  serve = _serve(out)
  model = serve.load(out)
  with pytest.raises(serve.ArtifactError, match="input 'x' is missing; the artifact expects "
                     r"x: float32\[batch, 16\]"):
    model({"y": np.ones((2, DIM), np.float32)})
  with pytest.raises(serve.ArtifactError, match="'x' has dtype float64, expected float32"):
    model({"x": np.ones((2, DIM))})
  with pytest.raises(serve.ArtifactError, match=r"'x' has shape \(2, 15\), expected "
                     r"\[batch, 16\]"):
    model({"x": np.ones((2, DIM - 1), np.float32)})
  # damaged artifacts: a truncated file, another format version, not an artifact
  with open(os.path.join(out, "weights.npz"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(serve.ArtifactError, match="weights.npz is truncated or changed"):
    serve.load(out)
  m = json.load(open(os.path.join(out, "manifest.json")))
  json.dump(dict(m, format="mmjax-artifact-v0"), open(os.path.join(out, "manifest.json"), "w"))
  with pytest.raises(serve.ArtifactError, match="format 'mmjax-artifact-v0', this loader "
                     "reads 'mmjax-artifact-v1'"):
    serve.load(out)
  with pytest.raises(serve.ArtifactError, match="not an mmjax artifact"):
    serve.load(str(tmp_path))
  with pytest.raises(ValueError, match=r"platforms \['gpu'\] unknown; valid: cpu, cuda, "
                     "rocm, tpu"):
    artifact.check_platforms(["cpu", "gpu"])
