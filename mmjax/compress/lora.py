"""LoRA adapters on a compressed model (Hu et al. 2022; over a quantized base, QLoRA,
Dettmers et al. 2023): each matched kernel W [K, N] computes with

    view(W) + (alpha / r) a @ b          a [K, r] ~ N(0, 1/K), b [r, N] = 0 at the start

where view(W) is what the methods before it made of W (GPTQ's grid codes, RTN, a pruned
kernel, or W itself). a and b are the protocol's trainable state (`trains=True`), trained
by the run's optimizer; with `config.optimizer.trainable="none"` nothing else moves, so the
base stays exactly its codes (recovery after post-training quantization, by distillation
from the dense model or by the task loss). The view adds (`adds=True`): the plan composes
it after the base's view on the same paths. `describe` returns a `storage.Adapter` record
(the export stores a and b beside the base's codes, the artifact computes
base + scale (x a) b).

    plan = Plan(rules([(r".*/kernel", gptq.method(grid))]),
                rules([(r".*/kernel", lora.adapters(rank=8))]))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.compress import storage
from mmjax.compress.protocol import TRAINABLE, Method


def check_rank(shapes: dict, rank: int) -> None:
  for path, shape in shapes.items():
    if len(shape) != 2:
      raise ValueError(f"{path} has shape {tuple(shape)}; LoRA adapters take 2-D kernels "
                       "[in, out] (narrow the rule's pattern).")
    if not 1 <= rank <= min(shape):
      raise ValueError(f"{path}: rank={rank} is outside [1, min(K, N)] = [1, {min(shape)}] "
                       f"for its shape {tuple(shape)}.")


def adapters(rank: int = 8, alpha: float | None = None, name: str | None = None) -> Method:
  """The method: state {"trainable": {path: {"a": [K, r], "b": [r, N]}}}; scale alpha / r
  (alpha defaults to r: scale 1)."""
  if not (isinstance(rank, int) and rank >= 1):
    raise ValueError(f"LoRA rank={rank!r} must be a positive integer.")
  scale = float(alpha if alpha is not None else rank) / rank

  def init(leaves, rng):
    out = {}
    for i, (path, w) in enumerate(sorted(leaves.items())):
      k, n = w.shape
      a = jax.random.normal(jax.random.fold_in(rng, i), (k, rank), jnp.float32) / jnp.sqrt(k)
      out[path] = {"a": a, "b": jnp.zeros((rank, n), jnp.float32)}
    return {TRAINABLE: out}

  def view(leaves, state):
    f = state[TRAINABLE]
    return {p: (w + scale * (f[p]["a"] @ f[p]["b"])).astype(w.dtype) for p, w in leaves.items()}

  def describe(leaves, state):
    f = state[TRAINABLE]
    return {p: storage.Adapter(f[p]["a"], f[p]["b"], scale) for p in leaves}

  def accepts(path, leaf):
    return None if len(leaf.shape) == 2 else f"shape {tuple(leaf.shape)} is not 2-D"

  return Method(name or f"lora_r{rank}", init=init, view=view, describe=describe,
                accepts=accepts, check=lambda shapes: check_rank(shapes, rank), trains=True,
                adds=True)
