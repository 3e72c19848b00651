"""A compressed model as a deployable artifact: its inference function serialized with
`jax.export` (StableHLO, for any of cpu / cuda / rocm / tpu, the batch dimension symbolic),
its weights as the low-bit arrays the export stores, and a manifest. `serve.py` (copied
in beside them) runs it with nothing but `jax`, `numpy` and `flatbuffers`: no model code,
no mmjax.

  write(out_dir, apply_fn, export_dir, example_inputs, platforms=("cpu", "cuda", "tpu"))

Directory:
  manifest.json     format, jax version, platforms, inputs (shapes with "batch" for the
                    symbolic dimension, dtypes), output, bytes and sha256 of each file, and
                    whatever the caller adds (modalities, label names, the source run)
  model.jaxexport   `jax.export.Exported.serialize()` of f(weights, inputs) -> outputs
  weights.npz       the export's own buffers, as stored (export.py: grid codes with 4-bit
                    two per byte, fp8 as bytes and other widths bit-packed, zero points,
                    float32 scales, packed masks, fp32 leaves, factors and adapters); a dense model's
                    artifact has one fp32 buffer. Where each leaf lies in them is part of
                    the program.
  serve.py          the loader

Inside the program each leaf is rebuilt from those arrays (bit planes unpacked, masks
scattered, codes times scales) and the model runs on the result; a product whose input the
run quantized to int8 (`activations.inputs(mode="int8")`) with an 8-bit per-channel weight
is computed from the stored codes as int8 x int8 -> int32, the weight never dequantized; a
factorized kernel's product is (x a) b, an adapted one's base + scale (x a) b.
So the artifact's outputs are those of the compressed model in process (tested), and the
bytes it ships are the export's, not a dense copy.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.compress import activations, bitpack, export, formats, intercept, layout, lowbit
from mmjax.compress.core import unflatten
from mmjax.compress.serve import sha256 as _sha256  # serve.py: jax, numpy, flatbuffers only

FORMAT = "mmjax-artifact-v1"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
PROGRAM, WEIGHTS, MANIFEST, SERVE = "model.jaxexport", "weights.npz", "manifest.json", "serve.py"


def check_platforms(platforms) -> tuple:
  platforms = tuple(p.strip() for p in platforms if p.strip())
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ValueError(f"platforms {bad or '(none)'} unknown; valid: {', '.join(PLATFORMS)} "
                     "(e.g. --platforms=cpu,cuda,tpu).")
  return platforms


# ------------------------------------------------------------- weights from an export

def weights_from_export(export_dir: str):
  """-> (buffers {kind: 1-D np.ndarray}, meta {path: static facts and spans}): the export's
  own buffers, as stored, and where each leaf's arrays lie in them."""
  index, bufs = export._read(export_dir)
  meta = {}
  span = lambda kind, s, shape=None: (kind, int(s[0]), int(s[1]),
                                      tuple(shape) if shape is not None else None)
  array = lambda e: span("fp32", e["at"], e["shape"])
  for path, e in index.items():
    m = dict(shape=tuple(e["shape"]), dtype=e["dtype"])
    if "mask" in e:
      m["mask"] = span("masks", e["mask"])
    if "act" in e:
      m["act"] = dict(e["act"])
    if "adapter" in e:
      m["adapter"] = dict(a=array(e["adapter"]["a"]), b=array(e["adapter"]["b"]),
                          scale=float(e["adapter"]["scale"]))
    if "grid" in e:
      m.update(kind="grid", grid=e["grid"], contract=tuple(e["contract"]), count=e["count"],
               packed=span("uint8", e["codes"]),
               scale=span("scales", e["scales"], e["scale_shape"]))
      if "zeros" in e:
        m["zero"] = span("uint8", e["zeros"], e["scale_shape"])
      if "in_scale" in e:
        m["in_scale"] = span("scales", e["in_scale"])
    elif "factors" in e:
      m.update(kind="factors", a=array(e["factors"]["a"]), b=array(e["factors"]["b"]))
    elif "codebook" in e:
      cb = e["codebook"]
      m.update(kind="codebook", centroids=array(cb["centroids"]), bits=cb["bits"],
               count=cb["count"], packed=span("uint8", cb["codes"]))
    else:
      m.update(kind="fp32", values=span("fp32", e["fp32"]))
    meta[path] = m
  return {k: np.asarray(v) for k, v in bufs.items()}, meta


def weights_from_params(flat: dict):
  """Uncompressed float leaves as an artifact's weights (a dense model's artifact)."""
  meta, parts, at = {}, [], 0
  for p, w in flat.items():
    w = np.asarray(w, np.float32).reshape(-1)
    meta[p] = dict(shape=tuple(np.shape(flat[p])), dtype=str(np.asarray(flat[p]).dtype),
                   kind="fp32", values=("fp32", at, w.size, None))
    parts.append(w)
    at += w.size
  return {"fp32": np.concatenate(parts)}, meta


# ------------------------------------------------------------ leaves rebuilt in program

def _get(bufs, m, name):
  """A leaf's array `name` (static slice of its buffer), or None."""
  if name not in m:
    return None
  kind, start, n, shape = m[name]
  x = bufs[kind][start:start + n]
  return x.reshape(shape) if shape is not None else x


def _keep(bufs, m):
  n = int(np.prod(m["shape"]))
  return jnp.unpackbits(_get(bufs, m, "mask"), count=n).astype(bool)


def _scatter(vals, keep):
  """Kept elements (in order) -> the full flat array, zeros where pruned."""
  idx = jnp.clip(jnp.cumsum(keep) - 1, 0, max(vals.shape[0] - 1, 0))
  return jnp.where(keep, vals[idx], jnp.zeros((), vals.dtype))


def _grid_codes(bufs, m):
  """A symmetric integer grid leaf's signed codes, [K, N] (its matrix view)."""
  grid = formats.from_dict(m["grid"])
  u = bitpack.unpack(_get(bufs, m, "packed"), m["count"], grid.code_bits, jnp)
  codes = (u.astype(jnp.int16) - grid.offset()).astype(jnp.int8)
  if "mask" in m:  # kept codes in matrix-view order; pruned ones are code 0
    codes = _scatter(codes, layout.to_matrix(_keep(bufs, m).reshape(m["shape"]),
                                             m["contract"]).reshape(-1))
  k = int(np.prod([m["shape"][a] for a in m["contract"]]))
  return codes.reshape(k, -1)


def _base(bufs: dict, m: dict):
  """One leaf's float weights from its codes, values or factors (no adapter)."""
  shape, kind = m["shape"], m["kind"]
  if kind == "fp32":
    v = _get(bufs, m, "values")
    if "mask" in m:
      v = _scatter(v, _keep(bufs, m))
    return v.reshape(shape)
  if kind == "factors":
    return (_get(bufs, m, "a") @ _get(bufs, m, "b")).reshape(shape)
  if kind == "codebook":
    idx = bitpack.unpack(_get(bufs, m, "packed"), m["count"], m["bits"], jnp)
    v = _get(bufs, m, "centroids")[idx.astype(jnp.int32)]
    if "mask" in m:
      v = _scatter(v, _keep(bufs, m))
    return v.reshape(shape)
  grid = formats.from_dict(m["grid"])
  scale = _get(bufs, m, "scale")
  zero = _get(bufs, m, "zero")
  stored = dict(packed=_get(bufs, m, "packed"), scale=scale,
                zero=zero.astype(jnp.float32) if zero is not None else jnp.zeros_like(scale),
                in_scale=_get(bufs, m, "in_scale"),
                mask=_keep(bufs, m).reshape(shape) if "mask" in m else None)
  return lowbit.dequantize(stored, dict(grid=grid, shape=shape, contract=m["contract"],
                                        count=m["count"]))


def _adapter(bufs, m):
  ad = m["adapter"]
  return _get(bufs, ad, "a"), _get(bufs, ad, "b"), ad["scale"]


def materialize(bufs: dict, m: dict):
  """One leaf's float weights from the stored buffers (jnp: runs inside the program)."""
  w = _base(bufs, m)
  if "adapter" in m:
    a, b, scale = _adapter(bufs, m)
    w = w + scale * (a @ b).reshape(m["shape"])
  return w.astype(m["dtype"])


def _integer_product(m) -> bool:
  """Products computed from the stored codes: int8 inputs, 8-bit symmetric per-channel
  integer grids on a plain [K, N] kernel."""
  act = m.get("act") or {}
  g = m.get("grid") or {}
  return (act.get("mode") == "int8" and m["kind"] == "grid" and g.get("kind") == "int"
          and g.get("bits") == 8 and g.get("symmetric") and g.get("granularity") == "channel"
          and tuple(m["contract"]) == (0,) and len(m["shape"]) == 2
          and "in_scale" not in m and "adapter" not in m)


def _low_rank(m) -> bool:
  """Products that compute through factors: (x a) b, and base + scale (x a) b."""
  return m["kind"] == "factors" or "adapter" in m


def _plain(d: intercept.Dot) -> bool:
  return d.w_is_rhs and d.w.ndim == 2 and d.dims == (((d.x.ndim - 1,), (0,)), ((), ()))


def _times(x, a):
  return jax.lax.dot_general(x, a.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))


def forward(apply_fn, meta: dict, like=None):
  """-> f(bufs, *args) = apply_fn(the rebuilt parameters, *args), with the products whose
  inputs the run quantized rewritten as it ran them, and the products of factorized or
  adapted kernels computed through their factors ((x a) b, never the [K, N] product).
  `like`: the parameter tree's structure (default: nested dicts, as Flax's)."""
  acts = {p: m["act"] for p, m in meta.items() if m.get("act")}
  low_rank = [p for p, m in meta.items() if _low_rank(m) and p not in acts]

  def f(bufs, *args):
    flat = {p: materialize(bufs, m) for p, m in meta.items()}
    params = unflatten(flat, like) if like is not None else unflatten(flat)
    if not acts and not low_rank:
      return apply_fn(params, *args)
    scales = {p: jnp.float32(a["scale"]) for p, a in acts.items()}
    by_mode = {p: activations.rewriter(scales, a["bits"], a["mode"], False,
                                       a.get("format", "int")) for p, a in acts.items()}

    def rewrite(d: intercept.Dot):
      m = meta[d.path]
      if d.path in acts:
        if _integer_product(m) and activations._is_plain_matmul(d):
          s_x = scales[d.path]
          xq = activations._codes(d.x.astype(jnp.float32), s_x)
          acc = jax.lax.dot_general(xq, _grid_codes(bufs, m), (((d.x.ndim - 1,), (0,)),
                                                               ((), ())),
                                    preferred_element_type=jnp.int32)
          y = acc.astype(jnp.float32) * (s_x * _get(bufs, m, "scale")[0])
          return y.astype(d.out_aval.dtype)
        return by_mode[d.path](d)
      if not _plain(d):  # a product of another shape: through the rebuilt weights
        return d.bind(d.x, d.w)
      if m["kind"] == "factors":
        return _times(_times(d.x, _get(bufs, m, "a")), _get(bufs, m, "b")).astype(
            d.out_aval.dtype)
      a, b, scale = _adapter(bufs, m)
      base = _base(bufs, m).astype(d.w.dtype)
      return (d.bind(d.x, base) + scale * _times(_times(d.x, a), b)).astype(d.out_aval.dtype)
    return intercept.dots(apply_fn, list(acts) + low_rank, rewrite, "artifact")(params, *args)
  return f


# ------------------------------------------------------------------------- writing

def _spec(x, batch_dim):
  x = np.asarray(x)
  return jax.ShapeDtypeStruct((batch_dim,) + x.shape[1:], x.dtype)


def write(out_dir: str, apply_fn, bufs: dict, meta: dict, example_inputs: dict,
          platforms=("cpu", "cuda", "tpu"), like=None, extra: dict | None = None) -> dict:
  """Export `apply_fn(params, inputs) -> outputs` over the stored `bufs` (from
  `weights_from_export` or `weights_from_params`) for `platforms`, the leading dimension
  of every input symbolic ("batch"), into `out_dir` (replaced only once complete).
  -> the manifest."""
  platforms = check_platforms(platforms)
  f = forward(apply_fn, meta, like)
  (b,) = jax.export.symbolic_shape("batch")
  in_spec = {k: _spec(v, b) for k, v in example_inputs.items()}
  w_spec = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in bufs.items()}
  exp = jax.export.export(jax.jit(f), platforms=platforms)(w_spec, in_spec)
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, PROGRAM), "wb") as fh:
    fh.write(exp.serialize())
  np.savez(os.path.join(tmp, WEIGHTS), **{k: np.asarray(v) for k, v in bufs.items()})
  shutil.copy(os.path.join(os.path.dirname(__file__), SERVE), os.path.join(tmp, SERVE))
  dims = lambda shape: ["batch" if not isinstance(d, int) else d for d in shape]
  out = exp.out_avals
  manifest = dict(
      format=FORMAT, jax_version=jax.__version__, platforms=list(platforms),
      inputs={k: dict(shape=dims(s.shape), dtype=str(s.dtype)) for k, s in in_spec.items()},
      outputs=[dict(shape=dims(o.shape), dtype=str(o.dtype)) for o in out],
      files={name: dict(bytes=os.path.getsize(os.path.join(tmp, name)),
                        sha256=_sha256(os.path.join(tmp, name)))
             for name in (PROGRAM, WEIGHTS, SERVE)},
      **(extra or {}))
  manifest["bytes"] = sum(f["bytes"] for f in manifest["files"].values())
  with open(os.path.join(tmp, MANIFEST), "w") as fh:
    json.dump(manifest, fh, indent=1)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.rename(tmp, out_dir)
  return manifest


def nbytes(out_dir: str) -> int:
  return export.disk_bytes(out_dir)

