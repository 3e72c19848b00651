"""The calibration-based one-shot methods selectable from a config: RTN, GPTQ, AWQ,
SparseGPT, Wanda, SmoothQuant. Each takes its statistics from config.calibration's batches
(`mode`: sequential, block by block through the compressed model, or parallel, all from
the dense model) and writes its result into the weights.

`rules=[(regex, {setting: value}), ...]` gives layers their own settings: when the rules
change only the number grid (bits, group...), one method calibrates every kernel in the
forward's order, each with its grid (an allocator's mixed precision); otherwise each rule
is a method of its own, the section's settings updated by the rule's."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mmjax.compress import formats, match_paths, rules
from mmjax.compress.post_training import (awq, gptq, row_weights, rtn, smoothquant,
                                          sparsegpt, wanda)
from mmjax.methods import registry
from mmjax.methods.registry import POST_TRAINING, Built, Settings, register, setting

GRID_FIELDS = ("format", "bits", "symmetric", "granularity", "group_size", "ragged_groups")
MODES = ("sequential", "parallel")
BALANCE_DOC = ("calibration tokens weighted by the task loss's sensitivity to them: none; "
               "modality (MBQ: each modality's mean, where a kernel sees several); token "
               "(each its own)")


@dataclasses.dataclass(frozen=True)
class _PostTraining(Settings):
  pattern: Optional[str] = setting(None, "regex over parameter paths; None: the family's "
                                   "matmul pattern")
  rules: tuple = setting((), "[(regex, {setting: value}), ...]: per-layer settings")

  def method(self, grids=None):
    """The compression Method these settings make (`grids`: {regex: Grid} per layer)."""
    raise NotImplementedError

  def build(self, ctx, where):
    base = ctx.pattern(self.pattern, "matmul")
    record = {"method": self.name, **{f.name: getattr(self, f.name)
                                      for f in dataclasses.fields(self)}}
    if not self.rules:
      return Built(rules([(base, self._method(where))], ctx.paths), record=record)
    overs = []
    for i, rule in enumerate(self.rules):
      pattern, over = rule
      over = dict(over.to_dict() if hasattr(over, "to_dict") else over)
      w = f"{where}.rules[{i}] ({pattern!r})"
      match_paths(pattern, ctx.paths, w)
      overs.append((pattern, over, w))
    if all(set(o) <= set(GRID_FIELDS) for _, o, _ in overs) and isinstance(self, _Grid):
      grids = {}
      for pattern, over, w in overs:
        _, s = registry.parse("", self._merged(over), w)
        try:
          grids[pattern] = s.grid()
        except ValueError as e:
          raise ValueError(f"{w}: {e}") from None
      union = "|".join(f"(?:{pattern})" for pattern in grids)
      covered = set(match_paths(union, ctx.paths, f"{where}.rules"))
      base_hits = set(match_paths(base, ctx.paths, f"{where}.pattern"))
      return Built(rules([(base if base_hits == covered else union,
                           self._method(where, grids))], ctx.paths), record=record)
    built = []
    for i, (pattern, over, w) in enumerate(overs):
      _, s = registry.parse("", self._merged(over), w)
      m = s._method(w)
      built.append((pattern, m.renamed(f"{m.name}_rule{i}")))
    return Built(rules(built, ctx.paths), record=record)

  def _merged(self, over: dict) -> dict:
    """This section's settings updated by a rule's (a rule may name another method: it
    keeps the settings that method has)."""
    name = over.get("method", self.name)
    keep = set(registry.defaults(name)) - {"rules"}
    mine = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {**{k: v for k, v in mine.items() if k in keep}, **over, "method": name}

  def _method(self, where, grids=None):
    try:
      return self.method(grids)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Grid(_PostTraining):
  format: str = setting("int", "the number grid", choices=("int", "nf4", "fp8_e4m3",
                                                           "fp8_e5m2"))
  bits: int = setting(4, "int grids: 2..8")
  symmetric: bool = setting(True, "int grids: symmetric (2**bits - 1 levels) or with a "
                            "zero point")
  granularity: str = setting("group", "one scale per tensor, output channel or group of "
                             "inputs", choices=formats.GRANULARITIES)
  group_size: int = setting(128, "inputs per group")
  ragged_groups: bool = setting(False, "a shorter last group where group_size does not "
                                "divide a kernel's inputs (else an error)")

  def grid(self):
    return formats.grid(self.format, self.bits, symmetric=self.symmetric,
                        granularity=self.granularity, group_size=self.group_size,
                        ragged=self.ragged_groups)

  def check(self, where):
    try:
      self.grid()
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Solver(_Grid):
  mode: str = setting("sequential", "statistics block by block through the compressed "
                      "model, or all from the dense model", choices=MODES)
  damp: float = setting(0.01, "Hessian dampening, a fraction of its mean diagonal")
  block: int = setting(128, "columns solved together (lazy batch updates)")


@register("rtn", stage=POST_TRAINING, doc="Round to nearest on the grid: the baseline the "
          "calibrated methods must beat.")
@dataclasses.dataclass(frozen=True)
class RTN(_Grid):
  name = "rtn"

  def method(self, grids=None):
    return rtn.method(grids if grids is not None else self.grid())


@register("gptq", stage=POST_TRAINING, doc="GPTQ (Frantar et al. 2022): columns rounded in "
          "turn, the error compensated through the inverse Hessian of the layer's inputs.")
@dataclasses.dataclass(frozen=True)
class GPTQ(_Solver):
  act_order: bool = setting(False, "columns in order of decreasing Hessian diagonal")
  balance: str = setting("none", BALANCE_DOC, choices=row_weights.BALANCES)
  name = "gptq"

  def method(self, grids=None):
    return gptq.method(grids if grids is not None else self.grid(), damp=self.damp,
                       block=self.block, act_order=self.act_order, mode=self.mode,
                       balance=self.balance)


@register("awq", stage=POST_TRAINING, doc="AWQ (Lin et al. 2023): per-input-channel scales "
          "from activation magnitudes, searched to minimise the layer's output error.")
@dataclasses.dataclass(frozen=True)
class AWQ(_Grid):
  mode: str = setting("sequential", "statistics block by block through the compressed "
                      "model, or all from the dense model", choices=MODES)
  n_grid: int = setting(20, "exponents searched in [0, 1]")
  balance: str = setting("none", BALANCE_DOC, choices=row_weights.BALANCES)
  name = "awq"

  def method(self, grids=None):
    return awq.method(grids if grids is not None else self.grid(), n_grid=self.n_grid,
                      mode=self.mode, balance=self.balance)


@dataclasses.dataclass(frozen=True)
class _Sparse(_PostTraining):
  mode: str = setting("sequential", "statistics block by block through the compressed "
                      "model, or all from the dense model", choices=MODES)
  sparsity: float = setting(0.5, "fraction removed per layer (unstructured)")
  n: int = setting(0, "N of N:M instead of unstructured, when m > 0")
  m: int = setting(0, "M of N:M (0: unstructured)")

  @property
  def n_m(self):
    return (self.n, self.m) if self.m else None


@register("sparsegpt", stage=POST_TRAINING, doc="SparseGPT (Frantar & Alistarh 2023): "
          "masks chosen and the kept weights updated through the inverse Hessian; "
          "optionally rounded to a grid in the same pass.")
@dataclasses.dataclass(frozen=True)
class SparseGPT(_Sparse, _Solver):
  joint_quant: bool = setting(False, "also round the kept weights to the grid")
  name = "sparsegpt"

  def method(self, grids=None):
    grid = (grids if grids is not None else self.grid()) if self.joint_quant else None
    return sparsegpt.method(self.sparsity, n_m=self.n_m, damp=self.damp, block=self.block,
                            grid=grid, mode=self.mode)


@register("wanda", stage=POST_TRAINING, doc="Wanda (Sun et al. 2023): |w| times the input's "
          "norm, per output; no weight update.")
@dataclasses.dataclass(frozen=True)
class Wanda(_Sparse):
  name = "wanda"

  def method(self, grids=None):
    return wanda.method(self.sparsity, n_m=self.n_m, mode=self.mode)


@register("smoothquant", stage=POST_TRAINING, doc="SmoothQuant (Xiao et al. 2023): "
          "activation outliers migrated into the weights by per-channel scales, then W8A8.")
@dataclasses.dataclass(frozen=True)
class SmoothQuant(_PostTraining):
  alpha: float = setting(0.5, "migration strength in [0, 1]")
  act_mode: str = setting("fake", "fake-quant products, or real int8 x int8 -> int32",
                          choices=("fake", "int8"))
  name = "smoothquant"

  def method(self, grids=None):
    return smoothquant.method(self.alpha, mode=self.act_mode)
