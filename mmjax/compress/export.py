"""Export a compressed model as what it really is: integer codes, scales, packed masks.

Format (a directory):
  index.json.gz  per parameter path: shape, bits, whether masked, granularity, the scale's
               shape, the activation scale of its input (when quantized), and offsets into
               the buffers below
  arrays/      one Orbax checkpoint of a handful of flat buffers:
               `int8`   codes of 8-bit leaves (kept elements only when masked)
               `packed` codes of 2..7-bit leaves, bit-packed (`bits` bits per value)
               `fp32`   leaves no quantizer touched (kept elements only when masked)
               `scales` float32 scales, per output channel or per tensor; grid scales
                        [groups, N] and AWQ's per-input scales
               `masks`  np.packbits of every masked leaf's mask, one bit per element
               `uint8`  codes of the post-training grids (`formats.Grid`), unsigned:
                        4-bit codes two per byte (low nibble first), fp8 as its byte, 8-bit
                        as is, other widths bit-packed; and asymmetric grids' zero points

Concatenating into a few buffers keeps Orbax's per-array metadata (a few hundred bytes an
array) from eating the savings of a small model. `disk_bytes` measures what landed on
disk. `load` rebuilds the float view (exactly the fake-quantized, masked weights the model
was trained with); `load_codes` gives the int8 codes and scales for integer inference,
`load_activation_scales` the calibrated input scales (`activations.apply_quantized`).
A leaf whose method states its own storage (`bytes` in its description) but whose codes
this format does not know is stored as its fp32 view, and the index says so.
The dense fp32 references are the same writer with no plan (`export(params)`), so the sizes
are measured alike: raw (`zstd=False`: 4 bytes a parameter, what "fp32 model size" means)
and zstd-compressed as Orbax writes checkpoints by default (trained fp32 weights shrink by
about 7% under zstd; int8 codes of trained weights carry ~7.7 bits of entropy, so against
that reference int8 cannot pass ~3.87x whatever the container).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil

import jax
import numpy as np

from mmjax.compress import formats, layout, quant
from mmjax.compress.core import Plan, flatten, unflatten

BUFFERS = ("int8", "packed", "fp32", "scales", "masks", "uint8")
INDEX = "index.json.gz"


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  u = (codes.astype(np.int16) + quant.qmax(bits)).astype(np.uint8)  # 0 .. 2*qmax < 2**bits
  planes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1))


def _unpack_codes(buf: np.ndarray, n: int, bits: int) -> np.ndarray:
  planes = np.unpackbits(buf, count=n * bits).reshape(n, bits)
  u = (planes.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(axis=1)
  return (u - quant.qmax(bits)).astype(np.int8)


def pack_unsigned(u: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes < 2**bits -> bytes: 8 bits as is, 4 bits two per byte (low nibble
  first: what the int4 matmul unpacks), other widths bit-planes."""
  u = np.asarray(u, np.uint8).reshape(-1)
  if bits == 8:
    return u
  if bits == 4:
    u = np.concatenate([u, np.zeros(len(u) % 2, np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
  planes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1))


def unpack_unsigned(buf: np.ndarray, n: int, bits: int) -> np.ndarray:
  if bits == 8:
    return buf[:n]
  if bits == 4:
    return np.stack([buf & 0xF, buf >> 4], axis=1).reshape(-1)[:n]
  planes = np.unpackbits(buf, count=n * bits).reshape(n, bits)
  return (planes.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(1).astype(np.uint8)


def _grid_entry(w, d, keep, put):
  """The codes of a post-training grid (`describe` gives grid, scale, zero, in_scale)."""
  grid = d["grid"]
  axes = tuple(d["contract"])
  m = np.asarray(layout.to_matrix(w, axes), np.float32)
  k = m.shape[0]
  scale = np.asarray(d["scale"], np.float32)
  zero = np.asarray(d["zero"], np.float32)
  ins = np.asarray(d["in_scale"], np.float32) if d.get("in_scale") is not None else None
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
               count=int(u.size), codes=put("uint8", pack_unsigned(u, grid.code_bits)),
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
  u = unpack_unsigned(_take(arrays, "uint8", entry["codes"]), entry["count"], entry["bits"])
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
  import orbax.checkpoint as ocp
  plan = plan or Plan()
  view = jax.device_get(flatten(jax.jit(plan.view)(params, cstate)))
  if info is None:  # `plan.describe(params, cstate)`, passed in by a caller that has it
    info = plan.describe(params, cstate) if not plan.is_identity else {}
  info = jax.device_get(info)
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
    d = info.get(path, {})
    entry = {"shape": list(w.shape), "dtype": str(view[path].dtype)}
    mask = d.get("mask")
    keep = np.asarray(mask, bool).reshape(-1) if mask is not None else None
    if keep is not None:
      entry["mask"] = put("masks", np.packbits(keep))
      w = np.where(keep.reshape(w.shape), w, 0.0)  # as `update` leaves them (Plan.start)
    per_layer = [k for k in ("act_scale", "in_scale") if k in d and np.ndim(d[k]) > (
        0 if k == "act_scale" else 1)]
    if per_layer:
      raise ValueError(f"export: {path} has per-layer {per_layer[0]}s (stacked layers under a "
                       "scan), which the export does not store yet; export it without "
                       "activation quantization, AWQ or SmoothQuant (grid codes, masks and "
                       "weight scales of stacked kernels export).")
    if "act_scale" in d:
      if not float(np.float32(d["act_scale"])) > 0.0:  # 0.0: `activations.inputs` at init
        raise ValueError(f"export: the input scale of {path} is not calibrated; calibrate "
                         "first: call plan.calibrate(apply_fn, params, cstate, batches).")
      entry["act"] = {"scale": float(np.float32(d["act_scale"])), "bits": int(d["act_bits"]),
                      "mode": d.get("act_mode", "fake"), "format": d.get("act_format", "int")}
    if d.get("codes") == "grid" and "grid" in d:
      entry.update(_grid_entry(w, d, keep, put))
    elif d.get("codes") == "symmetric":
      bits, gran = int(d["bits"]), d.get("granularity", "channel")
      axes = tuple(d.get("scale_axes", range(w.ndim - 1)))
      codes, scale = jax.device_get(quant.quantize(w, bits, gran, d.get("clip_ratio", 1.0),
                                                   contract=axes))
      codes = np.asarray(codes).reshape(-1)
      codes = codes[keep] if keep is not None else codes
      entry.update(bits=bits, granularity=gran, scale_shape=list(np.shape(scale)),
                   scales=put("scales", np.asarray(scale, np.float32).reshape(-1)))
      if bits == 8:
        entry["int8"] = put("int8", codes)
      else:
        entry["packed"] = put("packed", _pack_codes(codes, bits))
        entry["count"] = int(codes.size)
    else:
      if "bytes" in d:  # a method's own format: stored as its fp32 view, said so
        entry["stated_bytes"] = int(d["bytes"])
      vals = w.reshape(-1)
      entry["fp32"] = put("fp32", vals[keep] if keep is not None else vals)
    index[path] = entry

  dtypes = dict(int8=np.int8, packed=np.uint8, fp32=np.float32, scales=np.float32,
                masks=np.uint8, uint8=np.uint8)
  arrays = {k: np.concatenate(v).astype(dtypes[k]) for k, v in bufs.items()
            if sizes[k]}  # Orbax stores no empty arrays; the index never points at them
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=zstd)) as ckptr:
    ckptr.save(os.path.join(tmp, "arrays"), args=ocp.args.PyTreeSave(arrays))
  with gzip.open(os.path.join(tmp, INDEX), "wt") as f:  # paths repeat: gzip takes 85%
    json.dump({"format": "mmjax-compressed-v2", "plan": plan.name,
               "leaves": index}, f, separators=(",", ":"))
  shutil.rmtree(out_dir, ignore_errors=True)
  os.rename(tmp, out_dir)
  return index


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
  with ocp.StandardCheckpointer() as ckptr:
    arrays = ckptr.restore(os.path.join(os.path.abspath(export_dir), "arrays"))
  return index["leaves"], {k: np.asarray(v) for k, v in arrays.items()}


def _take(arrays, kind, span):
  start, n = span
  return arrays[kind][start:start + n]


def _leaf(entry, arrays):
  """-> (codes or values, scale or None, mask or None), codes/values in full shape."""
  shape = tuple(entry["shape"])
  n = int(np.prod(shape))
  keep = None
  if "mask" in entry:
    keep = np.unpackbits(_take(arrays, "masks", entry["mask"]), count=n).astype(bool)
  if "int8" in entry:
    vals = _take(arrays, "int8", entry["int8"])
  elif "packed" in entry:
    vals = _unpack_codes(_take(arrays, "packed", entry["packed"]), entry["count"],
                         entry["bits"])
  else:
    vals = _take(arrays, "fp32", entry["fp32"])
  if keep is not None:
    full = np.zeros(n, vals.dtype)
    full[keep] = vals
    vals = full
  scale = None
  if "scales" in entry:
    scale = _take(arrays, "scales", entry["scales"]).reshape(entry.get("scale_shape", [-1]))
  return vals.reshape(shape), scale, (keep.reshape(shape) if keep is not None else None)


def load_codes(export_dir: str) -> dict:
  """{path: {"codes" | "values": array, "scale": array or None, "mask": ...}}."""
  index, arrays = _read(export_dir)
  out = {}
  for path, entry in index.items():
    if "grid" in entry:  # post-training grids: `load_grid_codes` gives their codes
      mask = _mask(entry, arrays)
      out[path] = {"values": _grid_view(entry, arrays, mask), "scale": None, "mask": mask,
                   "bits": entry["bits"]}
      continue
    vals, scale, mask = _leaf(entry, arrays)
    key = "codes" if "bits" in entry else "values"
    out[path] = {key: vals, "scale": scale, "mask": mask, "bits": entry.get("bits", 32)}
  return out


def load(export_dir: str):
  """The float parameter tree the compressed model computes with (dequantized)."""
  index, arrays = _read(export_dir)
  flat = {}
  for path, entry in index.items():
    if "grid" in entry:
      flat[path] = _grid_view(entry, arrays, _mask(entry, arrays)).astype(entry["dtype"])
      continue
    vals, scale, _ = _leaf(entry, arrays)
    w = vals.astype(np.float32) * scale if scale is not None else vals.astype(np.float32)
    flat[path] = w.astype(entry["dtype"])
  return unflatten(flat)


def _mask(entry, arrays):
  if "mask" not in entry:
    return None
  return np.unpackbits(_take(arrays, "masks", entry["mask"]),
                       count=int(np.prod(entry["shape"]))).astype(bool)


def load_grid_codes(export_dir: str) -> dict:
  """{path: {"packed": the stored bytes, "grid", "shape", "contract", "scale" [G, N],
  "zero", "in_scale" or None, "mask" or None}} of the post-training grid leaves, as stored
  (4-bit codes two per byte): what a low-bit matmul consumes (`lowbit.py`)."""
  index, arrays = _read(export_dir)
  out = {}
  for path, entry in index.items():
    if "grid" not in entry:
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
