"""Run an mmjax artifact with nothing but `jax`, `numpy` and `flatbuffers` (this file is
copied into every artifact directory; it imports no mmjax and no model code).
`pip install jax numpy flatbuffers`: jax.export reads the program with flatbuffers, which
jax does not install; a missing one is named, in one line, before anything is read.

  import serve                                  # from the artifact directory
  model = serve.load("path/to/artifact")
  logits = model({"text": ..., "image": ..., ...})   # any batch size

  python serve.py path/to/artifact [--inputs batch.npz]   # a random batch if none given

`load` checks the manifest's format, that every file is whole (its sha256), and that this
backend is one the artifact was lowered for; a call checks each input's presence, dtype
and shape (the leading dimension is the batch, any size) and ignores extra keys (labels).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys

REQUIRES = ("jax", "numpy", "flatbuffers")
_missing = [m for m in REQUIRES if importlib.util.find_spec(m) is None]
if _missing:
  _msg = (f"this artifact's serve.py needs {', '.join(_missing)} (jax.export reads the "
          f"program with flatbuffers, which jax does not install): pip install "
          f"{' '.join(REQUIRES)}")
  if __name__ == "__main__":
    sys.exit(f"error: {_msg}")
  raise ImportError(_msg)

import numpy as np  # noqa: E402 (after the check above)

FORMAT = "mmjax-artifact-v1"


class ArtifactError(ValueError):
  pass


def sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _manifest(directory):
  path = os.path.join(directory, "manifest.json")
  if not os.path.exists(path):
    raise ArtifactError(f"{directory} is not an mmjax artifact (no manifest.json); write one "
                        "with `python -m mmjax.cli.deploy --workdir=<run> --out=<dir>`.")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ArtifactError(f"{path} is not readable JSON ({e}); the artifact is damaged: "
                        "write it again with `python -m mmjax.cli.deploy`.") from None
  if manifest.get("format") != FORMAT:
    raise ArtifactError(f"{path}: format {manifest.get('format')!r}, this loader reads "
                        f"{FORMAT!r}; use the serve.py inside that artifact, or write it "
                        "again with this version's `python -m mmjax.cli.deploy`.")
  for name, want in manifest["files"].items():
    p = os.path.join(directory, name)
    if not os.path.exists(p):
      raise ArtifactError(f"{p} is missing; copy the whole artifact directory.")
    if os.path.getsize(p) != want["bytes"] or sha256(p) != want["sha256"]:
      raise ArtifactError(f"{p} is truncated or changed ({os.path.getsize(p):,} bytes, the "
                          f"manifest says {want['bytes']:,}); copy it again or write the "
                          "artifact again with `python -m mmjax.cli.deploy`.")
  return manifest


def _backend_platform():
  import jax
  backend = jax.default_backend()
  if backend == "gpu":
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
  return backend


class Artifact:
  """A loaded artifact: call it on a batch (a dict of arrays) for the model's outputs."""

  def __init__(self, directory: str):
    import jax
    from jax import export
    self.directory = os.path.abspath(directory)
    self.manifest = m = _manifest(self.directory)
    here = _backend_platform()
    if here not in m["platforms"]:
      raise ArtifactError(f"this artifact was lowered for {m['platforms']}, not for this "
                          f"backend ({here}); write it again with --platforms including "
                          f"{here}.")
    with open(os.path.join(self.directory, "model.jaxexport"), "rb") as f:
      self.exported = export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(self.directory, "weights.npz")) as z:
      self.weights = jax.device_put({k: z[k] for k in z.files})
    self.inputs = m["inputs"]

  def check(self, batch: dict) -> dict:
    """The artifact's inputs from `batch` (extra keys dropped), or a clear error."""
    out = {}
    for name, spec in self.inputs.items():
      if name not in batch:
        raise ArtifactError(f"input {name!r} is missing; the artifact expects "
                            f"{self._spec_str()}.")
      x = np.asarray(batch[name]) if not hasattr(batch[name], "dtype") else batch[name]
      if str(x.dtype) != spec["dtype"]:
        raise ArtifactError(f"input {name!r} has dtype {x.dtype}, expected {spec['dtype']} "
                            f"(shape {self._shape_str(spec)}).")
      want = spec["shape"]
      if len(x.shape) != len(want) or any(
          w != "batch" and w != s for w, s in zip(want, x.shape)):
        raise ArtifactError(f"input {name!r} has shape {tuple(x.shape)}, expected "
                            f"{self._shape_str(spec)} (batch: any size).")
      out[name] = x
    sizes = {name: x.shape[0] for name, x in out.items()}
    if len(set(sizes.values())) > 1:
      raise ArtifactError(f"inputs disagree on the batch size: {sizes}.")
    return out

  def __call__(self, batch: dict):
    outs = self.exported.call(self.weights, self.check(batch))
    return outs

  @staticmethod
  def _shape_str(spec):
    return "[" + ", ".join(str(d) for d in spec["shape"]) + "]"

  def _spec_str(self):
    return ", ".join(f"{k}: {s['dtype']}{self._shape_str(s)}" for k, s in self.inputs.items())

  def random_batch(self, n: int, seed: int = 0) -> dict:
    """Inputs of the right shapes and dtypes (a smoke test, not meaningful data)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in self.inputs.items():
      shape = tuple(n if d == "batch" else d for d in s["shape"])
      if s["dtype"] == "bool":
        out[name] = np.ones(shape, bool)
      elif s["dtype"].startswith("int"):
        out[name] = rng.integers(3, 100, size=shape).astype(s["dtype"])
      else:
        out[name] = rng.normal(size=shape).astype(s["dtype"])
    return out


def load(directory: str) -> Artifact:
  return Artifact(directory)


def main(argv):
  import argparse
  ap = argparse.ArgumentParser(description="Run an mmjax artifact on a batch.")
  ap.add_argument("artifact", nargs="?", default=os.path.dirname(os.path.abspath(__file__)))
  ap.add_argument("--inputs", default=None, help=".npz of the inputs (default: random, 2)")
  args = ap.parse_args(argv)
  try:
    model = load(args.artifact)
    if args.inputs:
      with np.load(args.inputs) as z:
        batch = {k: z[k] for k in z.files}
    else:
      batch = model.random_batch(2)
    out = model(batch)
  except ArtifactError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for o in out if isinstance(out, (list, tuple)) else [out]:
    o = np.asarray(o)
    print(f"output {o.dtype}{list(o.shape)}")
    if o.ndim == 2:
      print("argmax per example:", o.argmax(-1).tolist())
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
