"""Quantization methods selectable from a config: fake-quant weights (QAT) and quantized
layer inputs (calibrated; fake-quant, or real int8 x int8 -> int32 products)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mmjax.compress import activations, lsq, quant, rules
from mmjax.methods.registry import ACTIVATIONS, QUANTIZE, Built, Settings, register, setting


@register("fake_quant", stage=QUANTIZE, doc="Symmetric fake-quantized weights with a "
          "straight-through estimator (QAT); exported as real integer codes and scales.")
@dataclasses.dataclass(frozen=True)
class FakeQuant(Settings):
  bits: int = setting(8, "2..8")
  granularity: str = setting("channel", "one scale per output channel (matrices; vectors "
                             "per tensor) or per tensor", choices=quant.GRANULARITIES)
  clip_ratio: float = setting(1.0, "scale = clip_ratio * max|w| / qmax")
  pattern: Optional[str] = setting(None, "regex over parameter paths; None: the family's "
                                   "weights pattern")

  def check(self, where):
    quant.check_bits(self.bits, f"{where}.bits")

  def build(self, ctx, where):
    t = quant.weights(self.bits, self.granularity, self.clip_ratio)
    return rules([(ctx.pattern(self.pattern, "weights"), t)], ctx.paths)


@register("lsq", stage=QUANTIZE, doc="Fake-quantized weights whose step sizes are trained "
          "with the model (LSQ, Esser et al. 2020): the clip range is learned.")
@dataclasses.dataclass(frozen=True)
class Lsq(Settings):
  bits: int = setting(4, "2..8")
  granularity: str = setting("channel", "one step size per output channel (matrices; "
                             "vectors per tensor) or per tensor", choices=quant.GRANULARITIES)
  pattern: Optional[str] = setting(None, "regex over parameter paths; None: the family's "
                                   "weights pattern")

  def check(self, where):
    quant.check_bits(self.bits, f"{where}.bits")

  def build(self, ctx, where):
    return rules([(ctx.pattern(self.pattern, "weights"), lsq.lsq(self.bits, self.granularity))],
                 ctx.paths)


@register("activations", stage=ACTIVATIONS, doc="The inputs of the layers that consume the "
          "rule's weights quantized per tensor with calibrated scales (config.calibration).")
@dataclasses.dataclass(frozen=True)
class Activations(Settings):
  bits: int = setting(8, "2..8 (int8 mode: 8)")
  mode: str = setting("fake", "fake-quant inputs, or real int8 x int8 -> int32 matmuls",
                      choices=activations.MODES)
  int8_grads: bool = setting(True, "int8 mode: the backward's products in int8 too")
  format: str = setting("int", "int, or fp8_e4m3 / fp8_e5m2 (fake-quant)")
  percentile: Optional[float] = setting(None, "clip at this percentile of |x| (50..100); "
                                        "None: at max|x|")
  pattern: Optional[str] = setting(None, "regex over parameter paths (the weights whose "
                                   "products' inputs are quantized); None: the family's "
                                   "activations pattern")

  def check(self, where):
    quant.check_bits(self.bits, f"{where}.bits")
    if self.mode == "int8" and self.bits != 8:
      raise ValueError(f"{where}.mode='int8' needs bits=8.")
    if self.percentile is not None and not 50.0 <= self.percentile <= 100.0:
      raise ValueError(f"{where}.percentile={self.percentile} must be in [50, 100].")

  def build(self, ctx, where):
    try:
      m = activations.inputs(self.bits, self.mode, int8_grads=self.int8_grads,
                             percentile=self.percentile, fmt=self.format)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    record = dict(bits=self.bits, mode=self.mode, percentile=self.percentile,
                  format=self.format, int8_grads=self.int8_grads)
    return Built(rules([(ctx.pattern(self.pattern, "activations"), m)], ctx.paths),
                 record=record)
