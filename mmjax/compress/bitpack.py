"""The one bit packing of stored codes: unsigned codes below 2**bits as bytes.

  8 bits   one code a byte
  4 bits   two codes a byte, the first in the low nibble (what the int4 matmul unpacks,
           `lowbit_matmul.py`)
  other    bit planes: code i's bit j is bit i * bits + j of the stream (np.packbits order)

The same functions run on NumPy arrays (the export writer and reader) and inside a jitted
program on jnp arrays (the artifact, the low-bit matmuls): pass `xp=jnp`. Signed codes are
made unsigned by the grid's offset (`formats.Grid.offset`) before packing.
"""
from __future__ import annotations

import numpy as np


def pack(u, bits: int) -> np.ndarray:
  """Unsigned codes (< 2**bits, any shape) -> the packed bytes (NumPy, on the host)."""
  u = np.asarray(u, np.uint8).reshape(-1)
  if bits == 8:
    return u
  if bits == 4:
    u = np.concatenate([u, np.zeros(len(u) % 2, np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
  return pack_planes(u, bits)


def pack_planes(u, bits: int) -> np.ndarray:
  planes = (np.asarray(u, np.uint8).reshape(-1)[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1))


def unpack(buf, count: int, bits: int, xp=np):
  """The packed bytes -> `count` unsigned codes (uint8), with NumPy or inside a program."""
  if bits == 8:
    return buf[:count]
  if bits == 4:
    return xp.stack([buf & 0xF, buf >> 4], axis=1).reshape(-1)[:count]
  return unpack_planes(buf, count, bits, xp)


def unpack_planes(buf, count: int, bits: int, xp=np):
  planes = xp.unpackbits(buf, count=count * bits).reshape(count, bits)
  return xp.sum(planes.astype(xp.uint16) << xp.arange(bits, dtype=xp.uint16),
                axis=1).astype(xp.uint8)
