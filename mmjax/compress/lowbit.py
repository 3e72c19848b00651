"""Weight-only low-bit inference from an export: the products that consume a post-training
grid's weights compute from the stored codes (4-bit codes two per byte, fp8 bytes, group
scales, zero points), unpacked and dequantized inside the jitted program, so the model's
weights stay at their stored width in memory and the dense copy exists only per product.

  served = lowbit.weight_only(apply_fn, export.load_grid_codes(dir))
  logits = jax.jit(served)(params, codes, x)  # params: the export's other leaves

`params` must still hold every leaf (the grid leaves' values are ignored: `placeholders`
gives zeros of their shape). The result equals the fake-quant view's forward (tested).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmjax.compress import bitpack, formats, intercept, layout


def dequantize(arrays: dict, meta: dict):
  """One leaf's float weights (kernel shape) from its codes, in jnp."""
  grid, shape, axes, count = meta["grid"], meta["shape"], meta["contract"], meta["count"]
  k = math.prod(shape[a] for a in axes)
  n = math.prod(shape) // k
  u = bitpack.unpack(arrays["packed"], count, grid.code_bits, jnp)
  if arrays.get("mask") is not None:  # kept codes only: scatter into the matrix view
    keep = layout.to_matrix(arrays["mask"], axes).reshape(-1)
    idx = jnp.cumsum(keep) - 1
    u = jnp.where(keep, u[jnp.clip(idx, 0, count - 1)], 0)
  if grid.kind.startswith("fp8"):
    codes = jax.lax.bitcast_convert_type(u, getattr(jnp, formats._FP8[grid.kind]))
  elif grid.kind == "nf4":
    codes = u
  else:
    codes = u.astype(jnp.int16) - grid.offset()
  codes = codes.reshape(k, n)
  w = grid.values(codes, grid.expand(arrays["scale"], k), grid.expand(arrays["zero"], k))
  if arrays.get("in_scale") is not None:
    w = w / arrays["in_scale"][:, None]
  if arrays.get("mask") is not None:
    w = jnp.where(layout.to_matrix(arrays["mask"], axes), w, 0.0)
  return layout.from_matrix(w, shape, axes)


def split(grid_codes: dict):
  """`export.load_grid_codes(...)` -> (arrays: jit inputs, meta: static)."""
  arrays, meta = {}, {}
  for path, c in grid_codes.items():
    arrays[path] = {k: jnp.asarray(c[k]) for k in ("packed", "scale", "zero", "in_scale",
                                                   "mask") if c.get(k) is not None}
    meta[path] = dict(grid=c["grid"], shape=c["shape"], contract=c["contract"],
                      count=c["count"], masked=c.get("mask") is not None)
  return arrays, meta


def placeholders(params_flat: dict, grid_codes: dict) -> dict:
  return {**params_flat, **{p: jnp.zeros(c["shape"], jnp.float32) for p, c in
                            grid_codes.items()}}


def kernel_eligible(meta: dict) -> bool:
  """Leaves the Pallas low-bit matmul serves: unmasked 4- or 8-bit integer grids on a 2-D
  [K, N] kernel (N even for 4-bit: two columns a byte)."""
  grid, shape = meta["grid"], meta["shape"]
  return (grid.kind == "int" and grid.bits in (4, 8) and len(shape) == 2
          and tuple(meta["contract"]) == (0,) and not meta.get("masked")
          and (grid.bits == 8 or shape[1] % 2 == 0))


def _kernel_product(d: intercept.Dot, a: dict, m: dict):
  """x @ W through `lowbit_matmul.product` (the Pallas kernel on GPU/TPU)."""
  from mmjax.compress import lowbit_matmul
  grid, (k, n) = m["grid"], m["shape"]
  x = d.x.reshape(-1, k).astype(jnp.float32)
  if a.get("in_scale") is not None:  # AWQ: x @ (Wq / s) = (x / s) @ Wq
    x = x / a["in_scale"][None, :]
  group = grid.blocks(k)
  full = lambda v: jnp.broadcast_to(v.astype(jnp.float32), (-(-k // group), n))  # per tensor
  y = lowbit_matmul.product(x, a["packed"], full(a["scale"]), full(a["zero"] + grid.offset()),
                            bits=grid.bits, group=group, n=n)
  return y.reshape(d.x.shape[:-1] + (n,)).astype(d.out_aval.dtype)


def weight_only(apply_fn, grid_codes: dict, kernel: bool = True):
  """-> f(params, arrays, *args): `apply_fn` with the grid leaves' products computed from
  `arrays` (the first output of `split`). `kernel`: plain 2-D products of 4- and 8-bit
  integer grids go through `lowbit_matmul.product` (the Pallas kernel where the program is
  lowered for GPU or TPU; on CPU the same dequantize-then-matmul as the other leaves)."""
  _, meta = split(grid_codes)

  def f(params, arrays, *args):
    def rewrite(d: intercept.Dot):
      m = meta[d.path]
      if (kernel and kernel_eligible(m) and d.w_is_rhs and d.dims == (
          ((d.x.ndim - 1,), (0,)), ((), ()))):
        return _kernel_product(d, arrays[d.path], m)
      w = dequantize(arrays[d.path], m).astype(d.w.dtype)
      return d.bind(d.x, w)
    return intercept.dots(apply_fn, list(meta), rewrite, "low-bit weights")(params, *args)
  return f
