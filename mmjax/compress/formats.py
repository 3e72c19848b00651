"""Number formats of quantized weights and activations: one `Grid` describes where the values
may lie, and the post-training methods (GPTQ rounds one input row at a time, AWQ searches
scales, RTN rounds everything) all round through it.

A grid works on a kernel's matrix view `[K, N]` (`layout.to_matrix`: K contracted inputs,
N outputs) and keeps one scale (and, asymmetric, one zero point) per block of rows:

  granularity="tensor"    one scale for the whole kernel           scale [1, 1]
  granularity="channel"   one per output column                    scale [1, N]
  granularity="group"     one per `group_size` rows of a column    scale [K / group_size, N]
                          (`ragged`: ceil(K / group_size), the last group shorter)

Formats (`kind`):
  int       `bits` in 2..8. Symmetric: codes -qmax..qmax, qmax = 2**(bits-1) - 1 (the range
            `quant.py` uses), scale = max|w| / qmax. Asymmetric: codes 0..2**bits - 1 with a
            zero point, the range [min(w, 0), max(w, 0)] (GPTQ's quantizer), so 0 is exact.
  fp8_e4m3  1-byte floats (`jnp.float8_e4m3fn`, max 448), scale = max|w| / 448
  fp8_e5m2  1-byte floats (`jnp.float8_e5m2`, max 57344)
  nf4       the 16 NormalFloat levels of QLoRA (Dettmers et al. 2023), quantiles of a
            standard normal, scaled by max|w| of the block (absmax)

`fit` takes scales from values; `round` puts values on the grid with given scales (what a
GPTQ step does with one row); `fake` is `round` with a straight-through gradient.
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int", "fp8_e4m3", "fp8_e5m2", "nf4")
GRANULARITIES = ("tensor", "channel", "group")
_FP8 = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def _normal_float_levels(offset: float = 0.9677083) -> np.ndarray:
  """QLoRA's NF4 construction: 8 positive and 7 negative quantiles of N(0, 1) between
  `offset` and 1/2, and an exact zero, normalized to [-1, 1]."""
  ppf = statistics.NormalDist().inv_cdf
  pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  v = np.sort(np.array(pos + [0.0] + neg))
  return (v / np.max(np.abs(v))).astype(np.float32)


NF4_LEVELS = _normal_float_levels()


def _float(x):
  """float32, or float64 where the caller computes in it (the tests' references)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Grid:
  kind: str = "int"
  bits: int = 8
  symmetric: bool = True
  granularity: str = "channel"
  group_size: int = 128
  ragged: bool = False  # a last, shorter group where group_size does not divide the inputs

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"number format {self.kind!r} is unknown; valid: {', '.join(KINDS)}.")
    if self.kind == "int" and not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
      raise ValueError(f"an integer grid needs bits in 2..8, got bits={self.bits!r}.")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity={self.granularity!r} is unknown; valid: "
                       f"{', '.join(GRANULARITIES)}.")
    if self.granularity == "group" and not (isinstance(self.group_size, int)
                                             and self.group_size >= 1):
      raise ValueError(f"group_size={self.group_size!r} must be a positive integer.")
    if self.kind in _FP8:
      dtype = getattr(jnp, _FP8[self.kind], None)
      try:  # a backend without the type fails here, at config time, not inside a run
        with jax.ensure_compile_time_eval():  # also when a grid is made inside a trace
          ok = dtype is not None and float(jnp.asarray(1.5, jnp.float32).astype(dtype)) == 1.5
      except Exception:  # noqa: BLE001 - whatever the backend raises, the answer is "no"
        ok = False
      if not ok:
        raise ValueError(f"format {self.kind} is not representable on backend "
                         f"{jax.default_backend()}; use kind='int' (bits=8).")

  # ---- what it costs
  @property
  def code_bits(self) -> int:
    return {"int": self.bits, "nf4": 4}.get(self.kind, 8)

  @property
  def name(self) -> str:
    fmt = f"w{self.bits}" if self.kind == "int" else self.kind
    fmt += "" if self.symmetric or self.kind != "int" else "a"
    gran = {"tensor": "t", "channel": "c"}.get(self.granularity, f"g{self.group_size}")
    return f"{fmt}{gran}"

  def blocks(self, k: int) -> int:
    """Rows a scale covers, for a kernel of `k` contracted inputs."""
    return self.group_size if self.granularity == "group" else k

  def num_groups(self, k: int) -> int:
    return -(-k // self.group_size) if self.granularity == "group" else 1

  def check(self, k: int, where: str = ""):
    if self.granularity == "group" and k % self.group_size and not self.ragged:
      raise ValueError(f"{where}group_size={self.group_size} does not divide the contraction "
                       f"dimension {k}; choose a divisor of {k} (e.g. "
                       f"{math.gcd(k, self.group_size)}), granularity='channel', or "
                       "ragged groups (the last group shorter, AutoGPTQ's g_idx = i // g).")

  def nbytes(self, k: int, n: int) -> float:
    """Bytes of codes, scales (fp32) and zero points (1 byte) of a [k, n] kernel."""
    groups = {"tensor": 1, "channel": n}.get(self.granularity, self.num_groups(k) * n)
    zero = 0 if self.symmetric or self.kind != "int" else groups
    return k * n * self.code_bits / 8 + 4 * groups + zero

  # ---- scales
  @property
  def _qmax(self) -> float:
    if self.kind == "int":
      return float(2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1)
    if self.kind == "nf4":
      return 1.0
    return float(jnp.finfo(getattr(jnp, _FP8[self.kind])).max)

  def fit(self, m):
    """m [K, N] -> (scale, zero), each [G, N] (G = 1 per channel; [1, 1] per tensor)."""
    m = _float(m)
    k, n = m.shape
    g = self.blocks(k)
    groups = -(-k // g)
    if groups * g != k:  # ragged: zero rows pad the last group (every range includes 0)
      m = jnp.pad(m, ((0, groups * g - k), (0, 0)))
    b = m.reshape(groups, g, n)
    axes = (1, 2) if self.granularity == "tensor" else (1,)
    if self.kind == "int" and not self.symmetric:
      lo = jnp.minimum(jnp.min(b, axis=axes), 0.0)
      hi = jnp.maximum(jnp.max(b, axis=axes), 0.0)
      scale = jnp.maximum(hi - lo, 1e-30) / self._qmax
      zero = jnp.round(-lo / scale)
    else:
      scale = jnp.maximum(jnp.max(jnp.abs(b), axis=axes), 1e-30) / self._qmax
      zero = jnp.zeros_like(scale)
    if self.granularity == "tensor":
      scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
    return scale, zero

  def expand(self, a, k: int):
    """[G, N] -> [K, N] (each scale repeated over the rows it covers)."""
    if a.shape[0] == k:
      return a
    if a.shape[0] == 1:
      return jnp.broadcast_to(a, (k, a.shape[1]))
    return jnp.repeat(a, self.group_size, axis=0)[:k]

  # ---- rounding (elementwise; scale and zero broadcast against x)
  def codes(self, x, scale, zero):
    """The stored code of x: int8 for integer grids, the fp8 value, the NF4 level index."""
    x = _float(x) / scale
    if self.kind == "int":
      if self.symmetric:
        return jnp.clip(jnp.round(x), -self._qmax, self._qmax).astype(jnp.int8)
      return jnp.clip(jnp.round(x) + zero, 0, self._qmax).astype(jnp.uint8)
    if self.kind == "nf4":
      levels = jnp.asarray(NF4_LEVELS)
      return jnp.argmin(jnp.abs(x[..., None] - levels), axis=-1).astype(jnp.uint8)
    dtype = getattr(jnp, _FP8[self.kind])
    return jnp.clip(x, -self._qmax, self._qmax).astype(dtype)

  def values(self, codes, scale, zero):
    if self.kind == "nf4":
      return jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)] * scale
    v = codes.astype(jnp.float32)
    return (v - zero) * scale if self.kind == "int" and not self.symmetric else v * scale

  def round(self, x, scale, zero):
    return self.values(self.codes(x, scale, zero), scale, zero).astype(x.dtype)

  def fake(self, x, scale, zero):
    """`round` with the identity gradient (straight through), for fine-tuning."""
    scale, zero = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(zero)
    # forward value exactly `round` (x - x is 0), so an export's rebuilt view is identical
    return jax.lax.stop_gradient(self.round(x, scale, zero)) + (x - jax.lax.stop_gradient(x))

  def offset(self) -> int:
    """What makes a stored code unsigned (symmetric integer codes start at -qmax)."""
    return 2 ** (self.bits - 1) if self.kind == "int" and self.symmetric else 0

  def round_matrix(self, m, scale, zero):
    k = m.shape[0]
    return self.round(m, self.expand(scale, k), self.expand(zero, k))


def from_dict(d: dict) -> Grid:
  return Grid(**{f.name: d[f.name] for f in dataclasses.fields(Grid)})


def grid(kind: str = "int", bits: int = 8, *, symmetric: bool = True,
         granularity: str = "channel", group_size: int = 128, ragged: bool = False) -> Grid:
  bits = {"nf4": 4}.get(kind, 8 if kind in _FP8 else bits)
  return Grid(kind, bits, symmetric, granularity, group_size, bool(ragged))
