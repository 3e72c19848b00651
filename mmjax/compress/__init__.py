"""Compression as parameter-tree transforms: pruning, quantization, distillation, export.

`core` holds the protocol (`Transform`, `chain`, `rules`, `Plan`); `pruning`, `quant`
the built-in transforms; `configure` turns `config.compress` into a `Plan`; `report` counts
what a plan did.
"""
from mmjax.compress.core import (IDENTITY, Plan, Transform, chain, flatten, match_paths,
                                 rules, unflatten)
from mmjax.compress.configure import build_plan

__all__ = ["IDENTITY", "Plan", "Transform", "build_plan", "chain", "flatten", "match_paths",
           "rules", "unflatten"]
