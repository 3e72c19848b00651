"""Module hooks: a stage that rewrites the outputs of modules selected by path, between
modules, so that a method may change what flows from one block to the next, sequence
lengths included (the base of token merging and token pruning).

    def drop_half(out, state):          # [batch, tokens, dim] -> the first half of tokens
      return out[:, : out.shape[1] // 2]
    method = Method("drop", hooks=((r"block_1", drop_half),))

A hook is `(module path regex, fn(output, state) -> output)`, matched in full against a
module's path joined by "/":
- Flax linen (mmjax's own models and foreign ones, unchanged): the module's scope path
  (`image/block_01`, the path of the parameters it owns without their last parts), through
  Flax's method interception (`nn.intercept_methods`).
- Flax NNX: the attribute path from the root module (`blocks/1`, as `nnx.iter_modules`
  gives it). NNX has no interception, so an NNX forward calls its root module through
  `hooks.call(model, *args)` instead of `model(*args)`; with no hook active it is exactly
  `model(*args)`. During a hooked call the `__call__` of the matched modules' classes is
  replaced, and restored after (also on error), and the replacement acts only on the
  matched instances: nothing outside the call sees a change.
A forward with no module in it (plain JAX) cannot be hooked and says so. `check` traces
the forward once (shapes only): a pattern that matches no module is an error listing the
nearest paths, and a hook whose output the next module cannot take is an error naming the
hook and the module, before anything runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import re
from typing import Callable, Sequence

import flax.linen as nn
import jax

# what a call in progress does with each module output: fn(path, output) -> output
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mmjax_hooks", default=None)


def module_path(context) -> str:
  return "/".join(context.module.path)


@contextlib.contextmanager
def _active(on_output: Callable):
  """Within: every linen `__call__` and every module of `call` passes its output through
  on_output(path, output)."""
  def interceptor(next_fun, a, k, context):
    out = next_fun(*a, **k)
    return on_output(module_path(context), out) if context.method_name == "__call__" else out

  token = _ACTIVE.set(on_output)
  try:
    with nn.intercept_methods(interceptor):
      yield
  finally:
    _ACTIVE.reset(token)


def call(model, *args, **kwargs):
  """`model(*args, **kwargs)` for an NNX root module, with the active hooks (if any)
  applied to its submodules' outputs by attribute path."""
  from flax import nnx  # only NNX forwards reach this
  on_output = _ACTIVE.get()
  if on_output is None:
    return model(*args, **kwargs)
  path_of = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(model)
             if path}
  # each class that defines the __call__ a submodule runs, patched once; an instance whose
  # __call__ reaches another patched one (super()) has its output hooked once, outermost
  owners = {next(c for c in type(m).__mro__ if "__call__" in vars(c))
            for path, m in nnx.iter_modules(model)
            if path and any("__call__" in vars(c) for c in type(m).__mro__)}
  originals, running = {}, set()
  for cls in owners:
    originals[cls] = inner = vars(cls)["__call__"]

    def hooked(self, *a, _inner=inner, **k):
      if id(self) in running or id(self) not in path_of:
        return _inner(self, *a, **k)
      running.add(id(self))
      try:
        out = _inner(self, *a, **k)
      finally:
        running.discard(id(self))
      return on_output(path_of[id(self)], out)
    cls.__call__ = hooked
  try:
    return model(*args, **kwargs)
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def apply(apply_fn: Callable, hooks: Sequence[tuple]) -> Callable:
  """`apply_fn` with `hooks` ((pattern, fn(output) -> output), ...) applied to the outputs
  of the modules whose path a pattern matches in full (in order, for each module)."""
  compiled = [(re.compile(p), fn) for p, fn in hooks]

  def on_output(path, out):
    for rx, fn in compiled:
      if rx.fullmatch(path):
        out = fn(out)
    return out

  def wrapped(*args, **kwargs):
    with _active(on_output):
      return apply_fn(*args, **kwargs)
  return wrapped


def module_paths(apply_fn: Callable, *args, **kwargs) -> list:
  """Every module path `apply_fn(*args)` calls, linen or NNX (traced for shapes only)."""
  seen = []

  def record(path, out):
    seen.append(path)
    return out

  def run(*a):
    with _active(record):
      return apply_fn(*a, **kwargs)
  jax.eval_shape(run, *args)
  return list(dict.fromkeys(p for p in seen if p))


def check(apply_fn: Callable, named_hooks: Sequence[tuple], *args, **kwargs) -> None:
  """`named_hooks`: ((method name, pattern, fn(output) -> output), ...). Every pattern
  matches a module of the forward, and the hooked forward traces; else one ValueError
  naming the method, the pattern or module, and what is valid."""
  paths = module_paths(apply_fn, *args, **kwargs)
  if not paths:
    raise ValueError("module hooks need a forward made of Flax modules: linen (hooked "
                     "through nn.intercept_methods) or NNX called as hooks.call(model, "
                     "...); this forward calls no module that can be hooked.")
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
