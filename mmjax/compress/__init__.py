"""Compression for any JAX model: methods as pure stages over the parameter tree.

`protocol` holds the protocol (`Method`), `binding` the rules, `core` the `Plan` that
composes them (and re-exports all three); `step` a compressed train
step for any `apply_fn` and optax optimizer; `pruning`, `structured`, `quant`,
`activations`, `distill`, `lowrank`, `lsq` the built-in methods; `hooks` rewrites module
outputs between modules (token pruning's base); `report` and `export` count and write
what a plan did. Nothing here imports mmjax's models or checkpointing (Orbax is imported only
when an export is written or read).
"""
from mmjax.compress.core import (Calibration, Forward, Method, Plan, chain, flatten,
                                 match_paths, rules, unflatten)

__all__ = ["Calibration", "Forward", "Method", "Plan", "chain", "flatten", "match_paths",
           "rules", "unflatten"]
