"""Pruning methods selectable from a config: magnitude and random (gradual or one shot, per
layer or global, per-rule sparsities), N:M, and whole heads or MLP units."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mmjax.compress import match_paths, pruning, rules, structured
from mmjax.methods.registry import PRUNE, Settings, register, setting


def _ramp(s: pruning.Ramp, where: str) -> pruning.Ramp:
  return s.validate(f"{where}.ramp")


@dataclasses.dataclass(frozen=True)
class _Unstructured(Settings):
  sparsity: float = setting(0.5, "fraction of weights removed, in [0, 1)")
  scope: str = setting("layer", "one threshold per leaf, or one over the rule's leaves",
                       choices=("layer", "global"))
  pattern: Optional[str] = setting(None, "regex over parameter paths; None: the family's "
                                   "matmul pattern")
  rules: tuple = setting((), "[(regex, sparsity), ...] instead of pattern/sparsity: one "
                         "part per rule")
  ramp: pruning.Ramp = setting(pruning.Ramp(), "the sparsity ramp, when masks are "
                               "recomputed: one_shot at begin, or polynomial (cubic) from "
                               "initial at begin to sparsity at end, every `every`")
  score = "magnitude"

  def check(self, where):
    _ramp(self.ramp, where)

  def build(self, ctx, where):
    pairs, names = list(self.rules), [f"{where}.rules[{i}] ({r[0]!r}) sparsity"
                                      for i, r in enumerate(self.rules)]
    if not pairs:
      pairs, names = [(ctx.pattern(self.pattern, "matmul"), self.sparsity)], [
          f"{where}.sparsity"]
    built = []
    for i, ((pattern, s), w) in enumerate(zip(pairs, names)):
      t = pruning.unstructured(pruning.check_sparsity(s, w), score=self.score,
                               scope=self.scope, ramp=self.ramp)
      built.append((pattern, t.renamed(f"{t.name}_rule{i}") if len(pairs) > 1 else t))
    return rules(built, ctx.paths)


@register("magnitude", stage=PRUNE, doc="Unstructured pruning by |w| (Zhu & Gupta's gradual "
          "ramp, or one shot).")
@dataclasses.dataclass(frozen=True)
class Magnitude(_Unstructured):
  score = "magnitude"


@register("random", stage=PRUNE, doc="Unstructured pruning of random weights (the baseline "
          "that magnitude must beat).")
@dataclasses.dataclass(frozen=True)
class Random(_Unstructured):
  score = "random"


@register("n_m", stage=PRUNE, doc="N:M semi-structured sparsity (2:4 runs on sparse tensor "
          "cores) along each kernel's contraction axes.")
@dataclasses.dataclass(frozen=True)
class NofM(Settings):
  n: int = setting(2, "weights kept in each group")
  m: int = setting(4, "group size along the inputs")
  pattern: Optional[str] = setting(None, "regex over parameter paths; None: the family's "
                                   "matmul pattern")
  ramp: pruning.Ramp = setting(pruning.Ramp(), "masks from step ramp.begin")
  recompute_every: Optional[int] = setting(None, "choose the mask again from the current "
                                           "weights every k steps after begin (1: each "
                                           "step); None: once, at begin")

  def check(self, where):
    if not 1 <= self.n < self.m:
      raise ValueError(f"{where}: N:M pruning needs integers 1 <= n < m, got n={self.n}, "
                       f"m={self.m} (e.g. n=2, m=4).")

  def build(self, ctx, where):
    pattern = ctx.pattern(self.pattern, "matmul")
    match_paths(pattern, ctx.paths, f"{where}.pattern")
    try:
      t = pruning.n_of_m(self.n, self.m, begin=self.ramp.begin,
                         every=self.recompute_every)
    except ValueError as e:
      raise ValueError(f"{where} (n={self.n}, m={self.m}): {e}") from None
    return rules([(pattern, t)], ctx.paths)


@dataclasses.dataclass(frozen=True)
class _Units(Settings):
  sparsity: float = setting(0.5, "fraction of units removed, in [0, 1)")
  pattern: Optional[str] = setting(None, "regex over parameter paths; None: the family's "
                                   "unit pattern")
  ramp: pruning.Ramp = setting(pruning.Ramp(), "as for magnitude")
  unit = "heads"

  def check(self, where):
    pruning.check_sparsity(self.sparsity, f"{where}.sparsity")
    _ramp(self.ramp, where)

  def build(self, ctx, where):
    fam = ctx.family
    if fam.structured_units is None:
      raise ValueError(f"{where}.method={self.unit!r}: model family {fam.name!r} defines no "
                       "structured units (Family.structured_units); use magnitude, random "
                       "or n_m pruning.")
    unit_pattern, layout = fam.structured_units(self.unit)
    pattern = self.pattern or unit_pattern
    match_paths(pattern, ctx.paths, f"{where}.pattern")
    what = "head" if self.unit == "heads" else "mlp"
    return rules([(pattern, structured.units(self.sparsity, layout, what=what,
                                             ramp=self.ramp))], ctx.paths)


@register("heads", stage=PRUNE, doc="Whole attention heads, ranked by weight norm; the run "
          "writes a physically smaller model where the family can shrink.")
@dataclasses.dataclass(frozen=True)
class Heads(_Units):
  unit = "heads"


@register("mlp_units", stage=PRUNE, doc="Whole MLP hidden units, ranked by weight norm.")
@dataclasses.dataclass(frozen=True)
class MlpUnits(_Units):
  unit = "mlp_units"
