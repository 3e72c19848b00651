"""Module hooks: a stage that rewrites the outputs of modules selected by path, between
modules, so that a method may change what flows from one block to the next, sequence
lengths included (the base of token merging and token pruning).

    def drop_half(out, state):          # [batch, tokens, dim] -> the first half of tokens
      return out[:, : out.shape[1] // 2]
    method = Method("drop", hooks=((r"block_1", drop_half),))

A hook is `(module path regex, fn(output, state) -> output)`; module paths are Flax
linen's, joined by "/" (`image/block_01`, the path of the parameters a module owns without
their last parts). Hooks act on linen modules' `__call__` through Flax's method
interception (`nn.intercept_methods`), so any linen model works unchanged, mmjax's own
and foreign ones; a forward with no linen module in it (plain JAX, NNX) cannot be hooked
and says so. `check` traces the forward once (shapes only): a pattern that matches no
module is an error listing the nearest paths, and a hook whose output the next module
cannot take is an error naming the hook and the module, before anything runs.
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Sequence

import flax.linen as nn
import jax


def module_path(context) -> str:
  return "/".join(context.module.path)


def apply(apply_fn: Callable, hooks: Sequence[tuple]) -> Callable:
  """`apply_fn` with `hooks` ((pattern, fn(output) -> output), ...) applied to the outputs
  of the modules whose path a pattern matches in full (in order, for each module)."""
  compiled = [(re.compile(p), fn) for p, fn in hooks]

  def wrapped(*args, **kwargs):
    def interceptor(next_fun, a, k, context):
      out = next_fun(*a, **k)
      if context.method_name != "__call__":
        return out
      path = module_path(context)
      for rx, fn in compiled:
        if rx.fullmatch(path):
          out = fn(out)
      return out

    with nn.intercept_methods(interceptor):
      return apply_fn(*args, **kwargs)
  return wrapped


def module_paths(apply_fn: Callable, *args, **kwargs) -> list:
  """Every linen module path `apply_fn(*args)` calls (traced for shapes only)."""
  seen = []

  def interceptor(next_fun, a, k, context):
    if context.method_name == "__call__":
      seen.append(module_path(context))
    return next_fun(*a, **k)

  def run(*a):
    with nn.intercept_methods(interceptor):
      return apply_fn(*a, **kwargs)
  jax.eval_shape(run, *args)
  return list(dict.fromkeys(p for p in seen if p))


def check(apply_fn: Callable, named_hooks: Sequence[tuple], *args, **kwargs) -> None:
  """`named_hooks`: ((method name, pattern, fn(output) -> output), ...). Every pattern
  matches a module of the forward, and the hooked forward traces; else one ValueError
  naming the method, the pattern or module, and what is valid."""
  paths = module_paths(apply_fn, *args, **kwargs)
  if not paths:
    raise ValueError("module hooks need a Flax linen forward (they act through "
                     "nn.intercept_methods); this forward calls no linen module.")
  for name, pattern, _ in named_hooks:
    rx = re.compile(pattern)
    if not any(rx.fullmatch(p) for p in paths):
      near = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.0)
      raise ValueError(f"compression method {name!r}: hook pattern {pattern!r} matches no "
                       f"module of the forward; nearest module paths: {near}.")
  for i, (name, pattern, fn) in enumerate(named_hooks):
    hooked = apply(apply_fn, [(p, f) for _, p, f in named_hooks[:i + 1]])
    try:
      jax.eval_shape(lambda *a: hooked(*a, **kwargs), *args)
    except Exception as e:  # noqa: BLE001 (whatever the next module raises on a bad shape)
      why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      raise ValueError(f"compression method {name!r}: the hook on {pattern!r} returns an "
                       f"output the rest of the forward cannot take ({type(e).__name__}: "
                       f"{why}); return what the next module accepts.") from None
