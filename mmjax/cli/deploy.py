"""A trained or compressed run as a deployable artifact (`mmjax/compress/artifact.py`).

  python -m mmjax.cli.deploy --workdir=<run> --out=<dir> [--platforms=cpu,cuda,tpu] [--evaluate]

The run's model (its config.json) and its weights: the compressed export (<run>/export:
low-bit codes, scales, zero points, packed masks, activation scales) when the run wrote
one, else the latest checkpoint's float parameters (a dense run). The artifact takes the
model's inputs (each modality and its padding mask, any batch size) and returns the logits;
`<dir>/serve.py` runs it with only jax, numpy and flatbuffers. Prints the artifact's bytes
next to the export's and the dense fp32 model's, and records them in the run's compression
report. `--evaluate`: the artifact evaluated on the test split by the run's task, beside
the run's own figure.
"""
from __future__ import annotations

import json
import os
import sys


def _read_config(workdir):
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"--workdir={workdir} is not a run directory (no config.json); give a "
                     "finished run's workdir.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _weights(workdir):
  """-> (bufs, meta, source): the export if the run wrote one, else its checkpoint."""
  from mmjax.compress import artifact, flatten
  from mmjax.harness import checkpointing
  export_dir = os.path.join(workdir, "export")
  if os.path.isdir(export_dir):
    bufs, meta = artifact.weights_from_export(export_dir)
    return bufs, meta, export_dir
  reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), read_only=True)
  try:
    step = reader.latest_step()
    if step is None:
      raise ValueError(f"--workdir={workdir} has neither an export nor a checkpoint; "
                       "finish the run first.")
    import jax
    params = jax.device_get(reader.restore_local(step)["params"])
  finally:
    reader.close()
  bufs, meta = artifact.weights_from_params(flatten(params))
  return bufs, meta, f"{workdir} (checkpoint step {step})"


def forward(config, fam):
  """The family's forward as the run computed it: with the run's module hooks (token
  merging, token pruning), which change what the model computes, not its weights."""
  from mmjax.harness.run_setup import validate
  plan = validate(config, read_checkpoints=False).compression.plan
  stateful = [m.name for m in plan.methods() if m.hooks and m.init is not None]
  if stateful:
    raise ValueError(f"deploy: method {stateful[0]!r} has module hooks that read its state; "
                     "the artifact cannot carry that state yet (hooks-only methods such as "
                     "tome and xprune deploy).")
  apply = plan.hooked(fam.apply, {})
  return lambda p, b: apply(p, b)[0]


def build(workdir: str, out: str, platforms=("cpu", "cuda", "tpu"), log=print) -> dict:
  """Write the artifact of run `workdir` into `out`; -> its manifest."""
  import numpy as np
  from mmjax.compress import artifact, export
  from mmjax.harness import family as family_lib, train
  platforms = artifact.check_platforms(platforms)
  workdir = os.path.abspath(workdir)
  config = _read_config(workdir)
  fam = family_lib.from_config(config)
  input_cfg = train.input_config(config, fam)
  bufs, meta, source = _weights(workdir)
  example = fam.example_batch(1, input_cfg, with_labels=False)
  apply = forward(config, fam)
  labels = list(fam.labels) if fam.labels is not None else None
  dense_bytes = 4 * sum(int(np.prod(m["shape"])) for m in meta.values())
  manifest = artifact.write(out, apply, bufs, meta, example, platforms,
                            like=fam.abstract_params(), extra=dict(
      source=source, modalities=list(fam.modalities), labels=labels,
      output_meaning="logits over the labels" if labels else "logits"))
  files = manifest["files"]
  sizes = dict(artifact_bytes=manifest["bytes"], program_bytes=files[artifact.PROGRAM]["bytes"],
               weights_bytes=files[artifact.WEIGHTS]["bytes"], dense_fp32_bytes=dense_bytes)
  if os.path.isdir(os.path.join(workdir, "export")):
    sizes["export_bytes"] = export.disk_bytes(os.path.join(workdir, "export"))
  log(f"[deploy] {os.path.abspath(out)}: {', '.join(platforms)}; weights from {source}")
  log(f"[deploy] bytes: artifact {sizes['artifact_bytes']:,} (program "
      f"{sizes['program_bytes']:,}, weights {sizes['weights_bytes']:,})"
      + (f", export {sizes['export_bytes']:,}" if "export_bytes" in sizes else "")
      + f", dense fp32 {dense_bytes:,} ({dense_bytes / sizes['artifact_bytes']:.2f}x the "
      "artifact)")
  report_path = os.path.join(workdir, "compression_report.json")
  if os.path.exists(report_path):
    with open(report_path) as f:
      rep = json.load(f)
    rep["artifact"] = dict(dir=os.path.abspath(out), platforms=list(platforms), **sizes)
    with open(report_path + ".tmp", "w") as f:
      json.dump(rep, f, indent=1)
    os.replace(report_path + ".tmp", report_path)
  return dict(manifest=manifest, sizes=sizes)


def evaluate(workdir: str, out: str, data_dir=None, log=print) -> dict:
  """The artifact (loaded by its own serve.py) evaluated on the run's test split by the
  run's task; -> its metrics, and the run's own `run_<metric>`."""
  import importlib.util
  import jax
  import numpy as np
  from mmjax.data import pipeline
  from mmjax.harness import family as family_lib, task as task_lib, train
  config = _read_config(os.path.abspath(workdir))
  if data_dir:
    config.data.data_dir = data_dir
  fam = family_lib.from_config(config)
  task = task_lib.from_config(config, fam)
  input_cfg = train.input_config(config, fam)
  spec = importlib.util.spec_from_file_location("mmjax_artifact_serve",
                                                os.path.join(out, "serve.py"))
  serve = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(serve)
  model = serve.load(out)
  sums = []
  for batch in pipeline.eval_batches(input_cfg):
    sums.append(task.eval_sums(jax.tree.map(np.asarray, model(batch)), batch))  # extra keys: dropped
  metrics = task_lib.evaluate(task, sums)
  run = None
  summary = os.path.join(workdir, "summary.json")
  if os.path.exists(summary):
    with open(summary) as f:
      run = json.load(f).get(f"eval_{task.metric}")
  log(f"[deploy] artifact test {task.metric} {metrics[task.metric]:.2%} on "
      f"{int(metrics['examples'])} examples"
      + (f" (the run: {run:.2%})" if run is not None else ""))
  return dict(metrics, **{f"run_{task.metric}": run})


def main(argv, flags_) -> int:
  from absl import logging
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  logging.set_verbosity(logging.WARNING)
  if not flags_.workdir or not flags_.out:
    print("error: --workdir=<a finished run> and --out=<artifact dir> are required.",
          file=sys.stderr)
    return 2
  try:
    build(flags_.workdir, flags_.out, flags_.platforms)
    if flags_.evaluate:
      evaluate(flags_.workdir, flags_.out, flags_.data_dir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  # flags only here: importing this module defines none (experiments own --data_dir etc.)
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "a finished run (dense or compressed)")
  flags.DEFINE_string("out", None, "the artifact directory to write")
  flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"],
                    "platforms to lower for: cpu, cuda, rocm, tpu")
  flags.DEFINE_string("data_dir", None, "--evaluate: the dataset directory (default: the "
                      "run's)")
  flags.DEFINE_bool("evaluate", False, "run the artifact on the test split")
  app.run(lambda argv: main(argv, flags.FLAGS))
