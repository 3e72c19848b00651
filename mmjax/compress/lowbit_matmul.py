"""x @ W with W stored as 4- or 8-bit grid codes: a Pallas kernel that unpacks and
dequantizes each group inside the kernel, so W never exists in float in memory. No kept
library has this for JAX (Pallas ships attention, not low-bit matmuls); it is the one
kernel mmjax writes.

Storage (the export's, `export.py`): unsigned codes u of the matrix view [K, N], row-major;
4-bit: two per byte, column 2j in the low nibble and 2j+1 in the high one ([K, N/2]
bytes); 8-bit: one per byte. A group of `group` rows shares a scale s [G, N] and a centre
c [G, N] (symmetric grids: 2^(bits-1); with a zero point: it), W = (u - c) * s.

  matmul(x [M, K], packed, scale, center, bits, group)   -> [M, N] float32

One program per (block of rows of x, block of columns of W); inside, a loop over the
groups of K: load the group's bytes, split nibbles (4-bit: the even and the odd columns,
two products, so no in-kernel interleave is needed; they are interleaved once on the
[M, N] output), (u - c) * s, dot, accumulate in float32. Block shapes are powers of two
(Triton's rule; TPU takes them too), so the wrapper pads M, K and N/2 with zeros: padded
x columns are zero, so padded codes add nothing.

`matmul` is the kernel, for GPU and TPU (`interpret=True` runs it on a CPU: the tests);
`reference` the same arithmetic in plain jnp, what CPUs run.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mmjax.compress import bitpack


def _pow2(n: int, at_least: int = 1) -> int:
  return max(at_least, 1 << (max(n, 1) - 1).bit_length())


def _pad_to(a, shape, value=0):
  return jnp.pad(a, [(0, s - d) for d, s in zip(a.shape, shape)], constant_values=value)


def split(packed, scale, center, bits: int, n: int):
  """Stored codes -> the kernel's operands: ([K, N'] bytes, scales and centres [G, N'])
  per column half (4-bit: even, odd; 8-bit: one), N' = N / 2 or N."""
  k = packed.size * 8 // bits // n
  if bits == 8:
    return [(packed.reshape(k, n), scale, center)]
  return [(packed.reshape(k, n // 2), scale[:, 0::2], center[:, 0::2]),
          (packed.reshape(k, n // 2), scale[:, 1::2], center[:, 1::2])]


def _kernel(x_ref, u_ref, s_ref, c_ref, *o_refs, bits, group, groups):
  bm, bn = o_refs[0].shape
  accs = [jnp.zeros((bm, bn), jnp.float32) for _ in o_refs]

  def body(g, accs):
    x = x_ref[:, pl.ds(g * group, group)].astype(jnp.float32)
    u = u_ref[pl.ds(g * group, group), :].astype(jnp.int32)  # bit ops on 32-bit (Triton)
    halves = [u] if bits == 8 else [u & 0xF, u >> 4]
    out = []
    for i, (acc, h) in enumerate(zip(accs, halves)):
      s = s_ref[i, pl.ds(g, 1), :]  # [1, bn]: this group's scales (even or odd columns)
      c = c_ref[i, pl.ds(g, 1), :]
      w = (h.astype(jnp.float32) - c) * s
      out.append(acc + jnp.dot(x, w, preferred_element_type=jnp.float32))
    return out
  accs = jax.lax.fori_loop(0, groups, body, accs)
  for o, acc in zip(o_refs, accs):
    o[...] = acc


@functools.partial(jax.jit, static_argnames=("bits", "group", "n", "block_m", "block_n",
                                             "platform", "interpret"))
def matmul(x, packed, scale, center, *, bits: int, group: int, n: int, block_m: int = 64,
           block_n: int = 128, platform: str = "gpu", interpret: bool = False):
  """x [M, K] @ W [K, n] from stored codes (see the module docstring) -> [M, n] float32.
  `scale`/`center` [G, n] (G = 1: per channel, `group` = K). `platform`: "gpu" compiles
  with Triton, "tpu" with Mosaic."""
  if bits not in (4, 8):
    raise ValueError(f"the low-bit matmul kernel takes 4- or 8-bit codes, got bits={bits}.")
  m, k = x.shape
  halves = split(packed, scale, center, bits, n)
  nh = halves[0][0].shape[1]
  grp = _pow2(group, 16)
  groups = -(-k // group)
  bm, bn = min(block_m, _pow2(m, 16)), min(block_n, _pow2(nh, 16))
  mp, np_ = -(-m // bm) * bm, -(-nh // bn) * bn
  # each group padded to a power of two (zero rows of x: no contribution), then K
  xg = _pad_to(jnp.pad(x, ((0, 0), (0, groups * group - k))).reshape(m, groups, group),
               (mp, groups, grp)).reshape(mp, groups * grp)
  u = _pad_to(jnp.pad(halves[0][0], ((0, groups * group - k), (0, 0)))  # shared by halves
              .reshape(groups, group, nh), (groups, grp, np_)).reshape(groups * grp, np_)
  s = jnp.stack([_pad_to(h[1].astype(jnp.float32), (groups, np_)) for h in halves])
  c = jnp.stack([_pad_to(h[2].astype(jnp.float32), (groups, np_)) for h in halves])
  outs = pl.pallas_call(
      functools.partial(_kernel, bits=bits, group=grp, groups=groups),
      grid=(mp // bm, np_ // bn),
      in_specs=[pl.BlockSpec((bm, groups * grp), lambda i, j: (i, 0)),
                pl.BlockSpec((groups * grp, bn), lambda i, j: (0, j)),
                pl.BlockSpec((len(halves), groups, bn), lambda i, j: (0, 0, j)),
                pl.BlockSpec((len(halves), groups, bn), lambda i, j: (0, 0, j))],
      out_specs=[pl.BlockSpec((bm, bn), lambda i, j: (i, j)) for _ in halves],
      out_shape=[jax.ShapeDtypeStruct((mp, np_), jnp.float32) for _ in halves],
      compiler_params=(pltriton.CompilerParams(num_warps=4, num_stages=2)
                       if platform == "gpu" else None),
      interpret=interpret, name=f"w{bits}_matmul")(xg, u, s, c)
  if bits == 8:
    return outs[0][:m, :n]
  return jnp.stack([outs[0][:m, :nh], outs[1][:m, :nh]], axis=-1).reshape(m, n)


def reference(x, packed, scale, center, *, bits: int, group: int, n: int):
  """The same product in plain jnp: the codes dequantized, then one matmul."""
  k = x.shape[1]
  u = bitpack.unpack(packed, k * n, bits, jnp).reshape(k, n)
  rows = lambda a: jnp.repeat(a, group, axis=0)[:k]
  w = (u.astype(jnp.float32) - rows(center)) * rows(scale)
  return jnp.dot(x.astype(jnp.float32), w, preferred_element_type=jnp.float32)


def product(x, packed, scale, center, *, bits: int, group: int, n: int):
  """The kernel of the platform the program is lowered for (Triton on CUDA, Mosaic on
  TPU), `reference` elsewhere (Pallas kernels do not compile for CPU)."""
  kw = dict(bits=bits, group=group, n=n)
  return jax.lax.platform_dependent(
      x, packed, scale, center,
      cuda=functools.partial(matmul, platform="gpu", **kw),
      tpu=functools.partial(matmul, platform="tpu", **kw),
      default=functools.partial(reference, **kw))
