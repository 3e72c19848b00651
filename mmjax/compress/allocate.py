"""Choose a compression setting per layer under a size budget, from measured sensitivities.

Each layer has candidate settings, each with the bytes it stores the layer in and the loss
increase measured when that layer alone is compressed so (everything else dense). The
allocator starts every layer at its largest candidate and repeatedly takes the move, over
all layers and all their smaller candidates, with the least loss increase per byte saved,
until the total fits the budget (the greedy rule of ModelOpt's `auto_quantize` and of
mixed-precision knapsack heuristics; it treats the layers' increases as additive, which the
one-at-a-time measurement assumes).
"""
from __future__ import annotations

from typing import NamedTuple


class Candidate(NamedTuple):
  setting: str   # a name the caller maps back to a method setting
  bytes: float   # the layer's storage under it
  delta: float   # loss increase when only this layer is compressed so


def bounds(candidates: dict) -> tuple:
  """(smallest reachable, largest) total bytes."""
  return (sum(min(c.bytes for c in cs) for cs in candidates.values()),
          sum(max(c.bytes for c in cs) for cs in candidates.values()))


def greedy(candidates: dict, budget: float, dense_bytes: float | None = None) -> dict:
  """{layer: [Candidate, ...]}, a budget in bytes -> {layer: Candidate}."""
  low, high = bounds(candidates)
  if dense_bytes is not None and budget >= dense_bytes:
    raise ValueError(f"allocation budget {budget:,.0f} B is not below the dense size "
                     f"{dense_bytes:,.0f} B; give a smaller budget.")
  if budget < low:
    raise ValueError(f"allocation budget {budget:,.0f} B is below the smallest reachable size "
                     f"{low:,.0f} B (every layer at its smallest setting); raise the budget "
                     "or add smaller settings.")
  choice = {layer: max(cs, key=lambda c: (c.bytes, -c.delta)) for layer, cs in
            candidates.items()}
  total = sum(c.bytes for c in choice.values())
  while total > budget:
    best = None
    for layer, cs in candidates.items():
      cur = choice[layer]
      for c in cs:
        saved = cur.bytes - c.bytes
        if saved <= 0:
          continue
        rate = (c.delta - cur.delta) / saved
        if best is None or rate < best[0]:
          best = (rate, layer, c)
    _, layer, c = best
    total -= choice[layer].bytes - c.bytes
    choice[layer] = c
  return choice
