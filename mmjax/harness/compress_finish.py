"""What a compression run writes at its end: the report, the real compressed export (its
bytes on disk measured next to dense fp32 references), and, after structured pruning, the
physically smaller model (written by the model family's `shrink`, where it has one).

The dense references are the uncompressed weights this run started from (config.init's,
else the fresh initialisation) written by the same writer: raw fp32 (4 bytes a parameter;
`disk_ratio`) and zstd'd as Orbax checkpoints are (`disk_ratio_zstd`), a dense model's
bytes, which zstd cannot shrink by finding the zeros that pruning made.
"""
from __future__ import annotations

import json
import os
import shutil

import jax

from mmjax.compress import export, report


def dense_accuracy(config, metric="accuracy"):
  """The task's metric of the run this one started from (config.init), if it recorded it."""
  init = config.get("init")
  if not init:
    return None
  for d in (init, os.path.dirname(os.path.normpath(init))):
    path = os.path.join(d, "summary.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f).get(f"eval_{metric}")
  return None


def write(config, workdir, compression, state, eval_metrics, dense_params_fn, family,
          log=print, metric="accuracy") -> dict:
  """compression_report.json, the printed table, <workdir>/export and <workdir>/shrunk;
  `metric`: the task's, reported as the accuracy next to the dense run's."""
  plan = compression.plan
  extra = dict(compression.settings)
  params = report.host_tree(state.params)
  cstate = report.host_tree(plan.merge(state.cstate, state.aux))  # trained factors back in
  info = plan.describe(params, cstate)
  if "activations" in extra:
    n = sum(1 for d in info.values() if d.act is not None)
    extra["activations"] = dict(extra["activations"], layers=n)
  if compression.export and jax.process_index() == 0:
    out = os.path.join(workdir, "export")
    export.export(params, out, plan, cstate, info=info)
    extra.update(export_dir=out, disk_bytes=export.disk_bytes(out))
    dense = dense_params_fn()
    for suffix, zstd in (("", False), ("_zstd", True)):
      dense_dir = os.path.join(workdir, f"export_dense_fp32{suffix}.tmp")
      export.export(dense, dense_dir, zstd=zstd)
      extra[f"disk_bytes_dense{suffix}"] = export.disk_bytes(dense_dir)
      extra[f"disk_ratio{suffix}"] = extra[f"disk_bytes_dense{suffix}"] / extra["disk_bytes"]
      shutil.rmtree(dense_dir)
  if any(d.mask is not None and d.mask.structured for d in info.values()) and jax.process_index() == 0:
    if family.shrink is None:
      log(f"[compress] model family {family.name!r} offers no physical shrink: the pruned "
          "units stay as zeros in the export")
    else:
      view = jax.device_get(jax.jit(plan.view)(params, cstate))
      extra.update(family.shrink(view, info, os.path.join(workdir, "shrunk")))
      log(f"[compress] physically shrunk model ({extra['shrunk_parameters']:,} parameters) "
          f"in {extra['shrunk_dir']}")
  rep = report.build(params, plan, cstate, info=info, accuracy=eval_metrics.get(metric),
                     dense_accuracy=dense_accuracy(config, metric), **extra)
  if jax.process_index() == 0:
    path = report.write(workdir, rep)
    log(report.format_table(rep))
    log(f"compression report: {path}")
  return rep
