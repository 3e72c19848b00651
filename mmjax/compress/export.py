"""Export a compressed model as what it really is: integer codes, scales, packed masks,
factors, each leaf as its storage records say (`storage.py`).

Format `mmjax-compressed-v3` (a directory):
  index.json.gz  per parameter path: shape, dtype, and one entry per record: `mask` (span
               of its packed bits), grid codes (`grid`, `contract`, `bits`, `count`, the
               codes' span, `scale_shape`, `scales`, `zeros`, `in_scale`), `factors`
               (spans and shapes of a and b), `codebook` (its values, the indices' span
               and width), `adapter` (a, b and scale), `act` (the
               input's scale, bits, mode, format), or `fp32` (the values' span), with
               `stated_bytes` when a method counts its own format
  arrays/      one Orbax checkpoint of a handful of flat buffers:
               `uint8`   grid codes, unsigned (`bitpack.py`: 8-bit one a byte, 4-bit two a
                         byte, other widths bit planes), codebook indices, and asymmetric
                         grids' zero points
               `scales`  float32 grid scales [G, N] and AWQ/SmoothQuant input scales
               `masks`   np.packbits of every masked leaf's mask, one bit per element
               `fp32`    leaves stored as values (kept elements only when masked), factors,
                         codebooks and adapters

QAT's symmetric codes are grid codes like the post-training methods' (one vocabulary,
`formats.Grid`). Concatenating into a few buffers keeps Orbax's per-array metadata (a few
hundred bytes an array) from eating the savings of a small model. `disk_bytes` measures
what landed on disk. `load` rebuilds the float view (exactly the weights the model was
trained with: codes times scales, masked, factors multiplied out, adapters added);
`load_grid_codes` gives the stored codes for low-bit inference (`lowbit.py`),
`load_activation_scales` the calibrated input scales (`activations.apply_quantized`).
The dense fp32 references are the same writer with no plan (`export(params)`), so the sizes
are measured alike: raw (`zstd=False`: 4 bytes a parameter, what "fp32 model size" means)
and zstd-compressed as Orbax writes checkpoints by default (trained fp32 weights shrink by
about 7% under zstd; int8 codes of trained weights carry ~7.7 bits of entropy, so against
that reference int8 cannot pass ~3.87x whatever the container).

Exports of format v2 (before storage records: QAT codes as signed int8 / bit planes) are
refused with the command that converts them (`mmjax/cli/convert_export.py`).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil

import jax
import numpy as np

from mmjax.compress import bitpack, formats, layout, storage
from mmjax.compress.core import Plan, flatten, unflatten

FORMAT = "mmjax-compressed-v3"
BUFFERS = ("uint8", "fp32", "scales", "masks")
INDEX = "index.json.gz"
KNOWN = (storage.Mask, storage.GridCodes, storage.Factors, storage.Codebook, storage.Stated,
         storage.Adapter, storage.ActScale)  # the records `write` stores


def _grid_entry(w, rec: storage.GridCodes, keep, put):
  """The codes of `w` on the record's grid with its scales."""
  grid, axes = rec.grid, tuple(rec.contract)
  m = np.asarray(layout.to_matrix(w, axes), np.float32)
  k = m.shape[0]
  scale = np.asarray(rec.scale, np.float32)
  zero = np.asarray(rec.zero, np.float32)
  ins = np.asarray(rec.in_scale, np.float32) if rec.in_scale is not None else None
  x = m * ins[:, None] if ins is not None else m
  codes = np.asarray(grid.codes(x, grid.expand(scale, k), grid.expand(zero, k)))
  if grid.kind.startswith("fp8"):
    u = codes.view(np.uint8)
  else:
    u = (codes.astype(np.int16) + grid.offset()).astype(np.uint8)
  u = u.reshape(-1)
  if keep is not None:
    u = u[np.asarray(layout.to_matrix(keep.reshape(w.shape), axes)).reshape(-1)]
  entry = dict(grid=dataclasses.asdict(grid), contract=list(axes), bits=grid.code_bits,
               count=int(u.size), codes=put("uint8", bitpack.pack(u, grid.code_bits)),
               scale_shape=list(scale.shape), scales=put("scales", scale.reshape(-1)))
  if grid.kind == "int" and not grid.symmetric:
    entry["zeros"] = put("uint8", zero.reshape(-1).astype(np.uint8))
  if ins is not None:
    entry["in_scale"] = put("scales", ins)
  return entry


def _grid_view(entry, arrays, keep):
  """The float weights a grid entry stands for: exactly the plan's view."""
  import jax.numpy as jnp
  grid = formats.from_dict(entry["grid"])
  shape, axes = tuple(entry["shape"]), tuple(entry["contract"])
  out = [a for a in range(len(shape)) if a not in axes]
  k = int(np.prod([shape[a] for a in axes]))
  n = int(np.prod([shape[a] for a in out]))
  u = bitpack.unpack(_take(arrays, "uint8", entry["codes"]), entry["count"], entry["bits"])
  keep_m = None
  if keep is not None:
    keep_m = np.asarray(layout.to_matrix(keep.reshape(shape), axes)).reshape(-1)
    full = np.zeros(k * n, np.uint8)
    full[keep_m] = u
    u = full
  if grid.kind.startswith("fp8"):
    codes = jnp.asarray(u.view(getattr(jnp, formats._FP8[grid.kind]).dtype).reshape(k, n))
  elif grid.kind == "nf4":
    codes = jnp.asarray(u.reshape(k, n))
  else:
    codes = jnp.asarray((u.astype(np.int16) - grid.offset()).reshape(k, n))
  scale = _take(arrays, "scales", entry["scales"]).reshape(entry["scale_shape"])
  zero = (_take(arrays, "uint8", entry["zeros"]).astype(np.float32).reshape(scale.shape)
          if "zeros" in entry else np.zeros_like(scale))
  vals = grid.values(codes, grid.expand(jnp.asarray(scale), k), grid.expand(jnp.asarray(zero), k))
  if "in_scale" in entry:
    vals = vals / jnp.asarray(_take(arrays, "scales", entry["in_scale"]))[:, None]
  if keep_m is not None:
    vals = jnp.where(jnp.asarray(keep_m.reshape(k, n)), vals, 0.0)
  return np.asarray(layout.from_matrix(vals, shape, axes))


def export(params, out_dir: str, plan: Plan | None = None, cstate=None,
           zstd: bool = True, info: dict | None = None) -> dict:
  """Write the compressed form of `params` under `plan`; returns the index.

  `zstd=False` stores the buffers raw (Orbax's default is zstd on every array): with no plan
  that is the plain dense fp32 reference, 4 bytes a parameter. Overwrites `out_dir` only
  once the new export is complete (written beside it, renamed)."""
  plan = plan or Plan()
  view = jax.device_get(flatten(jax.jit(plan.view)(params, cstate)))
  if info is None:  # `plan.describe(params, cstate)`, passed in by a caller that has it
    info = plan.describe(params, cstate) if not plan.is_identity else {}
  return write(view, jax.device_get(info), out_dir, plan.name, zstd)


def write(view: dict, stored: dict, out_dir: str, plan_name: str = "identity",
          zstd: bool = True) -> dict:
  """Write `view` ({path: the float weights the model computes with}) stored as `stored`
  says ({path: storage.Stored}; leaves without one as fp32). -> the index."""
  import orbax.checkpoint as ocp
  bufs = {k: [] for k in BUFFERS}
  sizes = {k: 0 for k in BUFFERS}
  index = {}

  def put(kind, arr):
    start = sizes[kind]
    bufs[kind].append(arr)
    sizes[kind] += arr.size
    return [start, arr.size]

  for path in sorted(view):
    w = np.asarray(view[path], np.float32)
    st = stored.get(path) or storage.Stored()
    unknown = [r for r in st.records() if type(r) not in KNOWN]
    if unknown:
      raise ValueError(f"export: {path} is described by a storage record "
                       f"{type(unknown[0]).__name__}, which the export cannot write (it writes "
                       f"{', '.join(c.__name__ for c in KNOWN)}); describe the leaf with one of "
                       "those (storage.Stated(bytes) keeps its fp32 view and counts your bytes), "
                       "or teach mmjax/compress/export.py to write it.")
    entry = {"shape": list(w.shape), "dtype": str(np.asarray(view[path]).dtype)}
    keep = np.asarray(st.mask.keep, bool).reshape(-1) if st.mask is not None else None
    if st.adapter is not None:  # the base is stored as it is: the view less the adapter
      entry["adapter"] = _adapter_entry(st.adapter, put)
      w = w - np.asarray(_adapter_delta(st.adapter), np.float32).reshape(w.shape)
    if keep is not None:
      entry["mask"] = put("masks", np.packbits(keep))
      w = np.where(keep.reshape(w.shape), w, 0.0)  # as `update` leaves them (Plan.start)
    if st.act is not None:
      entry["act"] = _act_entry(path, st.act)
    if isinstance(st.codes, storage.GridCodes):
      if np.ndim(st.codes.in_scale) > 1:
        raise ValueError(f"export: {path} has per-layer input scales (stacked layers under a "
                         "scan), which the export does not store yet; export it without AWQ "
                         "or SmoothQuant (grid codes, masks and weight scales of stacked "
                         "kernels export).")
      entry.update(_grid_entry(w, st.codes, keep, put))
    elif isinstance(st.codes, storage.Factors):
      if keep is not None:
        raise ValueError(f"export: {path} has both a mask and low-rank factors; a factorized "
                         "kernel is stored as its factors, so prune it or factorize it, not "
                         "both.")
      entry["factors"] = {k: _array_entry(getattr(st.codes, k), put) for k in ("a", "b")}
    elif isinstance(st.codes, storage.Codebook):
      entry["codebook"] = _codebook_entry(w, st.codes, keep, put)
    else:
      if isinstance(st.codes, storage.Stated):  # a method's own format: its fp32 view, said so
        entry["stated_bytes"] = int(st.codes.bytes)
      vals = w.reshape(-1)
      entry["fp32"] = put("fp32", vals[keep] if keep is not None else vals)
    index[path] = entry

  dtypes = dict(fp32=np.float32, scales=np.float32, masks=np.uint8, uint8=np.uint8)
  arrays = {k: np.concatenate(v).astype(dtypes[k]) for k, v in bufs.items()
            if sizes[k]}  # Orbax stores no empty arrays; the index never points at them
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=zstd)) as ckptr:
    ckptr.save(os.path.join(tmp, "arrays"), args=ocp.args.PyTreeSave(arrays))
  with gzip.open(os.path.join(tmp, INDEX), "wt") as f:  # paths repeat: gzip takes 85%
    json.dump({"format": FORMAT, "plan": plan_name, "leaves": index}, f,
              separators=(",", ":"))
  shutil.rmtree(out_dir, ignore_errors=True)
  os.rename(tmp, out_dir)
  return index


def _array_entry(a, put) -> dict:
  a = np.asarray(a, np.float32)
  return {"at": put("fp32", a.reshape(-1)), "shape": list(a.shape)}


def _codebook_entry(w, cb: storage.Codebook, keep, put) -> dict:
  """Each (kept) element's index of its nearest value in the codebook: the view is made of
  those values, so the indices give it back exactly."""
  c = np.asarray(cb.centroids, np.float32).reshape(-1)
  idx = np.argmin(np.abs(w.reshape(-1)[:, None] - c[None, :]), axis=1).astype(np.uint8)
  idx = idx[keep] if keep is not None else idx
  return {"centroids": _array_entry(c, put), "bits": cb.bits, "count": int(idx.size),
          "codes": put("uint8", bitpack.pack(idx, cb.bits))}


def _array(arrays, e):
  return _take(arrays, "fp32", e["at"]).reshape(e["shape"])


def _adapter_delta(ad: storage.Adapter):
  return ad.scale * (np.asarray(ad.a, np.float32) @ np.asarray(ad.b, np.float32))


def _adapter_entry(ad: storage.Adapter, put) -> dict:
  return {"a": _array_entry(ad.a, put), "b": _array_entry(ad.b, put), "scale": float(ad.scale)}


def _act_entry(path, act: storage.ActScale) -> dict:
  if np.ndim(act.scale) > 0:
    raise ValueError(f"export: {path} has per-layer activation scales (stacked layers under "
                     "a scan), which the export does not store yet; export it without "
                     "activation quantization (grid codes, masks and weight scales of stacked "
                     "kernels export).")
  if not float(np.float32(act.scale)) > 0.0:  # 0.0: `activations.inputs` at init
    raise ValueError(f"export: the input scale of {path} is not calibrated; calibrate "
                     "first: call plan.calibrate(apply_fn, params, cstate, batches).")
  return {"scale": float(np.float32(act.scale)), "bits": int(act.bits), "mode": act.mode,
          "format": act.format}


def disk_bytes(path: str) -> int:
  """Bytes of every file under `path`, as stored."""
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _read(export_dir):
  path = os.path.join(export_dir, INDEX)
  if not os.path.exists(path):
    raise ValueError(f"{export_dir} is not an mmjax export (no {INDEX}); write one with "
                     "mmjax.compress.export.export or a run with config.compress.export.")
  import orbax.checkpoint as ocp
  with gzip.open(path, "rt") as f:
    index = json.load(f)
  if index.get("format") != FORMAT:
    raise ValueError(f"{export_dir} is an mmjax export of format {index.get('format')!r}, "
                     f"written before storage records; this reader takes {FORMAT!r}. Convert "
                     f"it: python -m mmjax.cli.convert_export --src={export_dir}")
  with ocp.StandardCheckpointer() as ckptr:
    arrays = ckptr.restore(os.path.join(os.path.abspath(export_dir), "arrays"))
  return index["leaves"], {k: np.asarray(v) for k, v in arrays.items()}


def _take(arrays, kind, span):
  start, n = span
  return arrays[kind][start:start + n]


def _mask(entry, arrays):
  if "mask" not in entry:
    return None
  return np.unpackbits(_take(arrays, "masks", entry["mask"]),
                       count=int(np.prod(entry["shape"]))).astype(bool)


def leaf_values(entry, arrays) -> np.ndarray:
  """One leaf's float32 weights as the model computes with them."""
  shape, keep = tuple(entry["shape"]), _mask(entry, arrays)
  if "grid" in entry:
    w = _grid_view(entry, arrays, keep)
  elif "factors" in entry:
    f = entry["factors"]
    w = _array(arrays, f["a"]) @ _array(arrays, f["b"])
  elif "codebook" in entry:
    cb = entry["codebook"]
    vals = _array(arrays, cb["centroids"])[
        bitpack.unpack(_take(arrays, "uint8", cb["codes"]), cb["count"], cb["bits"])]
    w = vals if keep is None else np.zeros(keep.size, np.float32)
    if keep is not None:
      w[keep] = vals
  else:
    vals = _take(arrays, "fp32", entry["fp32"])
    if keep is not None:
      full = np.zeros(keep.size, np.float32)
      full[keep] = vals
      vals = full
    w = vals
  w = np.asarray(w, np.float32).reshape(shape)
  if "adapter" in entry:
    ad = entry["adapter"]
    w = w + ad["scale"] * (_array(arrays, ad["a"]) @ _array(arrays, ad["b"])).reshape(shape)
  return w


def load(export_dir: str):
  """The float parameter tree the compressed model computes with."""
  index, arrays = _read(export_dir)
  return unflatten({p: leaf_values(e, arrays).astype(e["dtype"]) for p, e in index.items()})


def load_grid_codes(export_dir: str) -> dict:
  """{path: {"packed": the stored bytes, "grid", "shape", "contract", "scale" [G, N],
  "zero", "in_scale" or None, "mask" or None}} of the grid leaves, as stored (4-bit codes
  two per byte): what a low-bit matmul consumes (`lowbit.py`). Leaves with an adapter are
  left out (their products add it: `leaf_values` gives their weights)."""
  index, arrays = _read(export_dir)
  out = {}
  for path, entry in index.items():
    if "grid" not in entry or "adapter" in entry:
      continue
    scale = _take(arrays, "scales", entry["scales"]).reshape(entry["scale_shape"])
    out[path] = dict(
        packed=_take(arrays, "uint8", entry["codes"]), count=entry["count"],
        grid=formats.from_dict(entry["grid"]), shape=tuple(entry["shape"]),
        contract=tuple(entry["contract"]), scale=scale,
        zero=(_take(arrays, "uint8", entry["zeros"]).astype(np.float32).reshape(scale.shape)
              if "zeros" in entry else np.zeros_like(scale)),
        in_scale=(_take(arrays, "scales", entry["in_scale"]) if "in_scale" in entry
                  else None), mask=_mask(entry, arrays))
  return out


def load_activation_scales(export_dir: str) -> dict:
  """{path: float32 input scale} of the weights whose products quantize their input, and
  the bits and mode they ran with: (scales, bits, mode)."""
  index, _ = _read(export_dir)
  acts = {p: e["act"] for p, e in index.items() if "act" in e}
  if not acts:
    return {}, None, None
  modes = {(a["bits"], a["mode"]) for a in acts.values()}
  bits, mode = sorted(modes)[0]
  return {p: np.float32(a["scale"]) for p, a in acts.items()}, bits, mode
