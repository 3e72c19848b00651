"""What compression did, leaf by leaf: realized sparsity, bits, dense and compressed bytes.

Counted from the parameters the model computes with (the compressed view), never from the
targets. Compressed bytes follow the export format (`mmjax.compress.export`): kept values
at their bit width (fp32 when not quantized), one bit per element for a mask (a packed
bitmap; for 2:4 that equals 2-bit indices of the kept pair), a float32 scale per quantized
channel or group. Each leaf's bytes are its storage records' (`storage.py`: each record
states its own `nbytes`); leaves with no record stay fp32. A leaf counts as compressed when
it has a record other than an activation scale. A leaf its rule matched but its method
skipped (`accepts`) says why in `skipped`. The
bytes on disk of an exported checkpoint are measured separately (`export.disk_bytes`) and
reported next to these.
"""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from mmjax.compress import storage
from mmjax.compress.core import Plan, flatten


def leaf_report(path, view, stored: storage.Stored | None) -> dict:
  view = np.asarray(view)
  n = int(view.size)
  stored = stored or storage.Stored()
  mask, codes = stored.mask, stored.codes
  row = dict(path=path, shape=list(view.shape), size=n,
             sparsity=1.0 - int(np.count_nonzero(view)) / max(n, 1), bits=stored.bits,
             masked=mask is not None, n_m=list(mask.n_m) if mask is not None and mask.n_m
             else None, dense_bytes=4 * n,
             compressed_bytes=int(math.ceil(stored.nbytes(tuple(view.shape)))),
             compressed=any(r is not stored.act for r in stored.records()))
  if codes is not None:
    row["format"] = (codes.name if isinstance(codes, storage.GridCodes) else
                     f"low_rank r={codes.rank}" if isinstance(codes, storage.Factors) else
                     getattr(codes, "what", "") or type(codes).__name__)
  if stored.adapter is not None:
    row["adapter_rank"] = int(np.shape(stored.adapter.a)[-1])
  if stored.skipped:
    row["skipped"] = stored.skipped
  return row


def _total(rows):
  size = sum(r["size"] for r in rows)
  dense = sum(r["dense_bytes"] for r in rows)
  comp = sum(r["compressed_bytes"] for r in rows)
  zeros = sum(r["sparsity"] * r["size"] for r in rows)
  return dict(size=size, sparsity=zeros / max(size, 1), dense_bytes=dense,
              compressed_bytes=comp, ratio=dense / max(comp, 1))


def host_tree(tree):
  """Arrays on this host (gathered across processes when they span several)."""
  if jax.process_count() > 1:  # arrays span processes: gather them (every process calls)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def build(params, plan: Plan, cstate, info: dict | None = None, **extra) -> dict:
  """The report of a compressed model: rows per leaf, totals, per-modality subtotals.
  `info` is `plan.describe(params, cstate)` when the caller already has it."""
  view = host_tree(flatten(jax.jit(plan.view)(params, cstate)))
  info = host_tree(plan.describe(params, cstate) if info is None else info)
  rows = [leaf_report(p, view[p], info.get(p)) for p in sorted(view)]
  groups = sorted({r["path"].split("/")[0] for r in rows})
  touched = [r for r in rows if r["compressed"]]
  return dict(plan=plan.name, leaves=rows, total=_total(rows),
              compressed_leaves=_total(touched) if touched else None,
              by_group={g: _total([r for r in rows if r["path"].split("/")[0] == g])
                        for g in groups}, **extra)


def _mb(b):
  return f"{b / 2**20:8.3f}"


def format_table(report: dict, max_rows: int = 40) -> str:
  lines = [f"compression: {report['plan']}",
           f"{'path':58s} {'shape':>14s} {'sparsity':>8s} {'bits':>4s} {'dense MB':>8s} "
           f"{'comp MB':>8s}"]
  rows = [r for r in report["leaves"] if r.get("compressed", r["masked"] or r["bits"] < 32)]
  for r in rows[:max_rows]:
    lines.append(f"{r['path'][-58:]:58s} {str(tuple(r['shape'])):>14s} {r['sparsity']:8.4f} "
                 f"{r['bits']:4d} {_mb(r['dense_bytes'])} {_mb(r['compressed_bytes'])}")
  if len(rows) > max_rows:
    lines.append(f"... {len(rows) - max_rows} more compressed leaves in compression_report.json")
  skipped = [r for r in report["leaves"] if r.get("skipped")]
  if skipped:
    lines.append(f"{len(skipped)} leaves matched by a rule were left as they are, e.g. "
                 f"{skipped[0]['path']} ({skipped[0]['skipped']})")
  lines.append("-" * 98)
  for g, t in report["by_group"].items():
    lines.append(f"{g:58s} {t['size']:14,d} {t['sparsity']:8.4f} {'':4s} {_mb(t['dense_bytes'])} "
                 f"{_mb(t['compressed_bytes'])}  x{t['ratio']:.2f}")
  t = report["total"]
  lines.append(f"{'TOTAL':58s} {t['size']:14,d} {t['sparsity']:8.4f} {'':4s} "
               f"{_mb(t['dense_bytes'])} {_mb(t['compressed_bytes'])}  x{t['ratio']:.2f} "
               "(dense fp32 / compressed)")
  if report.get("disk_bytes"):
    lines.append(f"on disk: compressed export {report['disk_bytes']:,} bytes in "
                 f"{report['export_dir']}; dense fp32 export {report['disk_bytes_dense']:,} "
                 f"bytes raw (x{report['disk_ratio']:.2f} smaller), "
                 f"{report['disk_bytes_dense_zstd']:,} zstd'd (x{report['disk_ratio_zstd']:.2f})")
  if report.get("accuracy") is not None:
    dense = report.get("dense_accuracy")
    lines.append(f"accuracy {report['accuracy']:.4f}" +
                 (f" (dense baseline {dense:.4f}, {report['accuracy'] / dense:.1%} of it)"
                  if dense else ""))
  return "\n".join(lines)


def write(workdir: str, report: dict) -> str:
  path = os.path.join(workdir, "compression_report.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  return path
