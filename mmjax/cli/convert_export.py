"""Convert an export written before storage records (format v2) to today's format (v3).

  python -m mmjax.cli.convert_export --src=<export dir> [--dst=<dir>]   (default: in place)

v2 stored QAT's symmetric codes apart from the grids (signed int8, or codes + qmax in bit
planes at every width, scales with the kernel's rank); v3 stores every code on a
`formats.Grid` (`storage.GridCodes`). The conversion decodes each leaf to the float weights
v2's reader gave, describes it with the records it was stored as (masks, grid codes with
the same scales, activation scales, stated bytes) and writes it with today's writer, so
the converted export loads to the same values (tested on a committed v2 export).
"""
from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np

from mmjax.compress import bitpack, export, formats, layout, storage

V2 = "mmjax-compressed-v2"


def _read_v2(src):
  import orbax.checkpoint as ocp
  path = os.path.join(src, export.INDEX)
  if not os.path.exists(path):
    raise ValueError(f"{src} is not an mmjax export (no {export.INDEX}).")
  with gzip.open(path, "rt") as f:
    index = json.load(f)
  if index.get("format") != V2:
    raise ValueError(f"{src} has format {index.get('format')!r}; this converts {V2!r} "
                     f"exports (a {export.FORMAT!r} export needs no conversion).")
  with ocp.StandardCheckpointer() as ckptr:
    arrays = ckptr.restore(os.path.join(os.path.abspath(src), "arrays"))
  return index, {k: np.asarray(v) for k, v in arrays.items()}


def _symmetric(entry, arrays, keep):
  """A v2 QAT leaf -> (float weights, GridCodes with the same scales)."""
  shape, bits = tuple(entry["shape"]), int(entry["bits"])
  qmax = 2 ** (bits - 1) - 1
  if "int8" in entry:
    codes = export._take(arrays, "int8", entry["int8"]).astype(np.int16)
  else:  # v2 packed codes + qmax as bit planes, at every width (4 included)
    u = bitpack.unpack_planes(export._take(arrays, "packed", entry["packed"]), entry["count"],
                              bits)
    codes = u.astype(np.int16) - qmax
  if keep is not None:
    full = np.zeros(keep.size, np.int16)
    full[keep] = codes
    codes = full
  scale = export._take(arrays, "scales", entry["scales"]).reshape(entry["scale_shape"])
  w = (codes.reshape(shape).astype(np.float32) * scale).astype(np.float32)
  # the scale was kept with the kernel's rank: its axes of size 1 are the ones reduced
  axes = tuple(a for a in range(len(shape)) if scale.shape[a] == 1) if scale.ndim == len(
      shape) else tuple(range(len(shape)))
  scale_m = np.asarray(layout.to_matrix(np.broadcast_to(scale, shape), axes))[:1]
  rec = storage.GridCodes(scale_m, np.zeros_like(scale_m),
                          grid=formats.grid("int", bits, granularity="channel"), contract=axes)
  return w, rec


def convert(src: str, dst: str | None = None) -> dict:
  """Rewrite the v2 export `src` as v3 in `dst` (default: `src`, replaced once complete)."""
  index, arrays = _read_v2(src)
  view, stored = {}, {}
  for path, e in index["leaves"].items():
    keep = export._mask(e, arrays)
    st = storage.Stored(mask=storage.Mask(keep.reshape(e["shape"])) if keep is not None
                        else None)
    if "act" in e:
      a = e["act"]
      st = storage.merge(st, storage.ActScale(np.float32(a["scale"]), int(a["bits"]),
                                              a.get("mode", "fake"), a.get("format", "int")), path)
    if "grid" in e:
      w = export._grid_view(e, arrays, keep)
      scale = export._take(arrays, "scales", e["scales"]).reshape(e["scale_shape"])
      zero = (export._take(arrays, "uint8", e["zeros"]).astype(np.float32).reshape(scale.shape)
              if "zeros" in e else np.zeros_like(scale))
      ins = export._take(arrays, "scales", e["in_scale"]) if "in_scale" in e else None
      st = storage.merge(st, storage.GridCodes(scale, zero, ins,
                                               grid=formats.from_dict(e["grid"]),
                                               contract=tuple(e["contract"])), path)
    elif "bits" in e:
      w, rec = _symmetric(e, arrays, keep)
      st = storage.merge(st, rec, path)
    else:
      vals = export._take(arrays, "fp32", e["fp32"])
      if keep is not None:
        full = np.zeros(keep.size, np.float32)
        full[keep] = vals
        vals = full
      w = vals.reshape(e["shape"])
      if "stated_bytes" in e:
        st = storage.merge(st, storage.Stated(int(e["stated_bytes"])), path)
    view[path] = np.asarray(w, np.float32).astype(e["dtype"])
    stored[path] = st
  return export.write(view, stored, dst or src, index.get("plan", "identity"))


def main(argv):
  from absl import flags
  src = flags.DEFINE_string("src", None, "the v2 export directory", required=True)
  dst = flags.DEFINE_string("dst", None, "where to write the v3 export (default: in place)")
  flags.FLAGS(argv)
  try:
    convert(src.value, dst.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"converted {src.value} to {export.FORMAT} in {dst.value or src.value}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
