"""What a compressed leaf is stored as: the typed records a method's `describe` returns.

    describe(leaves, state) -> {path: record or (record, ...)}

A record says how one leaf is stored and what it costs; the report counts it
(`nbytes`), the export writes it, the artifact and the low-bit paths read it back, each by
looping over a leaf's records, so none of them branches on a method's name. Each record
has a `role`, and a leaf holds at most one record per role (a later method's replaces an
earlier one's, as views compose):

  role     record        stored as
  mask     Mask          one bit per element (np.packbits); N:M or structured units noted
  codes    GridCodes     codes on a `formats.Grid` (int 2..8 bits, nf4, fp8) with its
                         scales [G, N] (and zero points, and AWQ / SmoothQuant input scales)
                         over the kernel's matrix view (`layout.to_matrix`, `contract`)
           Factors       low-rank factors: the leaf is a @ b (a [K, r], b [r, N])
           Codebook      k shared values: a ceil(log2 k)-bit index an element + the values
           Stated        a format mmjax does not store: exported as the fp32 view, counted
                         at the bytes the method states
  adapter  Adapter       added to the leaf after its codes: scale * a @ b (LoRA)
  act      ActScale      the calibrated scale of the input of the products using the leaf
  skipped  (a reason)    the rule matched the leaf but its method left it as it is

`Stored` is one leaf's records by role (`Plan.describe` gives {path: Stored}). A record of
your own is any frozen dataclass with a `role` and `nbytes(shape, kept)`: the report counts
it; the export refuses it, naming it, until a writer for it exists (`export.py`).
Records are pytrees (array fields are leaves, the rest static), so descriptions move
between devices and hosts like the parameters.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import numpy as np

from mmjax.compress import formats, layout

ROLES = ("mask", "codes", "adapter", "act")


def _pytree(cls, data: tuple):
  meta = tuple(f.name for f in dataclasses.fields(cls) if f.name not in data)
  return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))


def _matrix_shape(shape, contract) -> tuple:
  k = math.prod(shape[a] for a in contract)
  return k, math.prod(shape) // max(k, 1)


@dataclasses.dataclass(frozen=True)
class Mask:
  """Kept elements (bool, the leaf's shape)."""
  keep: Any
  n_m: Optional[tuple] = None       # N:M groups along the contraction axes
  structured: Optional[str] = None  # the unit a structured method removed (heads, neurons)
  unit_axis: Optional[int] = None
  role = "mask"

  def nbytes(self, shape, kept) -> float:
    return math.ceil(math.prod(shape) / 8)


@dataclasses.dataclass(frozen=True)
class GridCodes:
  """Codes on `grid` with fixed scales over the matrix view [K, N] of the leaf (`contract`:
  its contracted axes). The leaf is grid.values(codes, scale, zero) / in_scale[:, None]."""
  scale: Any                   # [G, N]
  zero: Any                    # [G, N] (zeros for symmetric grids)
  in_scale: Any = None         # [K] AWQ's / SmoothQuant's input scales, or None
  grid: formats.Grid = formats.Grid()
  contract: tuple = ()
  label: Optional[str] = None  # the report's name of the format (default: the grid's)
  role = "codes"

  @property
  def bits(self) -> int:
    return self.grid.code_bits

  @property
  def name(self) -> str:
    return self.label or self.grid.name

  def nbytes(self, shape, kept) -> float:
    k, n = _matrix_shape(shape, self.contract)
    scales = self.grid.nbytes(k, n) - k * n * self.grid.code_bits / 8
    extra = 4 * int(np.size(self.in_scale)) if self.in_scale is not None else 0
    return kept * self.grid.code_bits / 8 + scales + extra

  @classmethod
  def fit(cls, w, grid: formats.Grid, contract: tuple, **kw) -> "GridCodes":
    """Scales fitted to `w` (the grid's own rule: max|w| per block, or the range)."""
    scale, zero = grid.fit(layout.to_matrix(w, tuple(contract)))
    return cls(scale, zero, grid=grid, contract=tuple(contract), **kw)


@dataclasses.dataclass(frozen=True)
class Factors:
  """The leaf [K, N] as a @ b, a [K, r], b [r, N] (stored in their dtype)."""
  a: Any
  b: Any
  role = "codes"
  bits = 32

  @property
  def rank(self) -> int:
    return int(self.a.shape[1])

  def nbytes(self, shape, kept) -> float:
    return (np.size(self.a) + np.size(self.b)) * np.dtype(self.a.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Codebook:
  """Every element one of the k values of `centroids` [k] (k-means weight sharing): stored
  as a ceil(log2 k)-bit index an element and the k float32 values."""
  centroids: Any
  role = "codes"

  @property
  def bits(self) -> int:
    return max(1, (int(np.size(self.centroids)) - 1).bit_length())

  def nbytes(self, shape, kept) -> float:
    return kept * self.bits / 8 + 4 * int(np.size(self.centroids))


@dataclasses.dataclass(frozen=True)
class Stated:
  """A storage format mmjax does not write: the export stores the fp32 view and says so,
  the report counts `bytes`."""
  bytes: int
  bits: int = 32
  what: str = ""
  role = "codes"

  def nbytes(self, shape, kept) -> float:
    return float(self.bytes)


@dataclasses.dataclass(frozen=True)
class Adapter:
  """Added to the leaf [K, N] after its codes: scale * a @ b (a [K, r], b [r, N], fp32)."""
  a: Any
  b: Any
  scale: float = 1.0
  role = "adapter"

  def nbytes(self, shape, kept) -> float:
    return 4 * (np.size(self.a) + np.size(self.b))


@dataclasses.dataclass(frozen=True)
class ActScale:
  """The calibrated per-tensor scale of the inputs of the products using the leaf."""
  scale: Any
  bits: int = 8
  mode: str = "fake"
  format: str = "int"
  role = "act"

  def nbytes(self, shape, kept) -> float:
    return 4 * int(np.size(self.scale))


for _cls, _data in ((Mask, ("keep",)), (GridCodes, ("scale", "zero", "in_scale")),
                    (Factors, ("a", "b")), (Codebook, ("centroids",)), (Stated, ()), (Adapter, ("a", "b")),
                    (ActScale, ("scale",))):
  _pytree(_cls, _data)


@dataclasses.dataclass(frozen=True)
class Stored:
  """One leaf's records, by role."""
  mask: Any = None
  codes: Any = None
  adapter: Any = None
  act: Any = None
  skipped: Optional[str] = None

  def records(self) -> list:
    return [r for r in (self.mask, self.codes, self.adapter, self.act) if r is not None]

  @property
  def bits(self) -> int:
    """The stored width of the leaf's values: its codes' (32 when it has none)."""
    return int(getattr(self.codes, "bits", 32)) if self.codes is not None else 32

  def kept(self, shape) -> int:
    return int(np.sum(np.asarray(self.mask.keep))) if self.mask is not None else math.prod(shape)

  def nbytes(self, shape) -> float:
    """Bytes of the leaf as stored: its codes (fp32 values when none; kept elements only
    under a mask), its mask, adapter and activation scale."""
    kept = self.kept(shape)
    total = 4.0 * kept if self.codes is None else 0.0
    return total + sum(r.nbytes(shape, kept) for r in self.records())


_pytree(Stored, ("mask", "codes", "adapter", "act"))


def is_record(x) -> bool:
  return dataclasses.is_dataclass(x) and getattr(type(x), "role", None) in ROLES


def merge(stored: Optional[Stored], described, where: str) -> Stored:
  """`stored` with the records a method's describe gave one leaf (a record or a tuple of
  them; each replaces the record of its role)."""
  stored = stored or Stored()
  items = described if isinstance(described, (tuple, list)) else (described,)
  for r in items:
    if not is_record(r):
      hint = (" (a dict: the protocol before storage records; return e.g. storage.Mask(keep)"
              " for 'mask', storage.GridCodes for 'codes', storage.Stated(bytes) for 'bytes')"
              if isinstance(r, dict) else "")
      raise ValueError(f"{where} returned {type(r).__name__}, which is not a storage record"
                       f"{hint}; describe returns records of mmjax.compress.storage "
                       f"(roles {', '.join(ROLES)}).")
    stored = dataclasses.replace(stored, **{r.role: r})
  return stored
