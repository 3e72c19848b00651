"""Module hooks: a stage that rewrites the outputs of modules selected by path, between
modules, so that a method may change what flows from one block to the next, sequence
lengths included (the base of token merging and token pruning).

    def drop_half(out, state):          # [batch, tokens, dim] -> the first half of tokens
      return out[:, : out.shape[1] // 2]
    method = Method("drop", hooks=((r"block_1", drop_half),))

A hook is `(module path regex, fn(output, state) -> output)`, matched in full against a
module's path joined by "/". `Around(fn)` instead runs the module itself:
`fn(call, state) -> output`, where `call` (a `ModuleCall`) has the module's `path`,
`args`, `kwargs` and the `module` itself, and `call(*args, **kwargs)` runs it (`call()`: with its own inputs;
so a hook may change the inputs first: a mask, an attention bias), and `call.carry` is a
dict the method's hooks share within one forward, fresh at every call (what token
merging passes from block to block: the tokens' sizes, the keys it matches on). Paths:
- Flax linen (mmjax's own models and foreign ones, unchanged): the module's scope path
  (`image/block_01`, the path of the parameters it owns without their last parts), through
  Flax's method interception (`nn.intercept_methods`); the root module's path is ""
  (a hook around the whole forward, whose `call.module.variables` are all the parameters).
- Flax NNX: the attribute path from the root module (`blocks/1`, as `nnx.iter_modules`
  gives it). NNX has no interception, so an NNX forward calls its root module through
  `hooks.call(model, *args)` instead of `model(*args)`; with no hook active it is exactly
  `model(*args)`. During a hooked call, the `__call__` of the classes of the modules a
  pattern matches (say `Block`) is wrapped, under a lock, and restored after (also on
  error); the wrapper acts on the matched instances only, but other code calling a module
  of such a class in another thread meanwhile runs through it (unchanged, not hooked).
  Not hooked: modules run under `nnx.scan` / `nnx.vmap` / `nnx.remat` (rebuilt as new
  objects), and a module shared at two paths answers to the first. A nested `hooks.call`
  (a submodel called the same way) leaves it to the outer one.
Hooks act while the forward is traced, so an `apply_fn` that is itself a `jax.jit`-ed
function, already traced without hooks, keeps its cached program: jit the hooked forward
(`plan.wrap(apply_fn, ...)`), not the bare one.
A forward with no module in it (plain JAX) cannot be hooked and says so. `check` traces
the forward once (shapes only): a pattern that matches no module is an error listing the
nearest paths, and a hook whose output the next module cannot take is an error naming the
hook and the module, before anything runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import re
import threading
from typing import Callable, Sequence

import flax.linen as nn
import jax

# what a call in progress does with module outputs: (fn(path, output) -> output,
# matches(path) -> whether fn wants that module's output at all)
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mmjax_hooks", default=None)
_IN_NNX_CALL: contextvars.ContextVar = contextvars.ContextVar("mmjax_nnx_call", default=False)
_PATCH_LOCK = threading.RLock()  # class attributes are process-wide


@dataclasses.dataclass(frozen=True)
class Around:
  """A hook that runs the module itself: fn(call: ModuleCall, state) -> output."""
  fn: Callable


class HookError(ValueError):
  """A hook's own complaint about its settings (say, more tokens to merge than a block
  has): `check` reports it as it is, not as a shape the next module cannot take."""


@dataclasses.dataclass(frozen=True)
class ModuleCall:
  """One module call seen by an `Around` hook: `call()` runs it as it was called,
  `call(*args, **kwargs)` with other inputs; `module` is the module itself (its
  attributes: an attention's `num_heads`)."""
  path: str
  args: tuple
  kwargs: dict
  carry: dict
  run: Callable
  module: object = None

  def __call__(self, *args, **kwargs):
    return self.run(*args, **kwargs) if (args or kwargs) else self.run(*self.args,
                                                                       **self.kwargs)

  def arg(self, index: int, name: str, default=None):
    """The input given at position `index` or as keyword `name` (a block's `mask`, which
    callers pass either way); `default` if neither."""
    return self.args[index] if len(self.args) > index else self.kwargs.get(name, default)

  def with_arg(self, index: int, name: str, value):
    """-> (args, kwargs) with that input replaced where the caller gave it; as they were
    if it was not given. Run them with `call(*args, **kwargs)`."""
    args, kwargs = list(self.args), dict(self.kwargs)
    if len(args) > index:
      args[index] = value
    elif name in kwargs:
      kwargs[name] = value
    return args, kwargs


def module_path(context) -> str:
  return "/".join(context.module.path)


@contextlib.contextmanager
def _active(on_call: Callable, matches: Callable):
  """Within: every linen `__call__`, and every module of `call` whose path `matches`, runs
  as on_call(path, run, args, kwargs, module) (run(*args, **kwargs) calls the module)."""
  def interceptor(next_fun, a, k, context):
    if context.method_name != "__call__":
      return next_fun(*a, **k)
    return on_call(module_path(context), next_fun, a, k, context.module)

  token = _ACTIVE.set((on_call, matches))
  try:
    with nn.intercept_methods(interceptor):
      yield
  finally:
    _ACTIVE.reset(token)


def call(model, *args, **kwargs):
  """`model(*args, **kwargs)` for an NNX root module, with the active hooks (if any)
  applied to its submodules' outputs by attribute path."""
  from flax import nnx  # only NNX forwards reach this
  active = _ACTIVE.get()
  if active is None or _IN_NNX_CALL.get():
    return model(*args, **kwargs)
  on_call, matches = active
  iter_modules = getattr(nnx, "iter_modules", None) or type(model).iter_modules
  path_of, owners = {}, set()
  for path, m in iter_modules(model):
    p = "/".join(str(x) for x in path)
    if path and matches(p) and id(m) not in path_of:
      path_of[id(m)] = p
      # the class that defines the __call__ it runs, wrapped once; an instance whose
      # __call__ reaches another wrapped one (super()) has its output hooked once
      owners.add(next((c for c in type(m).__mro__ if "__call__" in vars(c)), None))
  owners.discard(None)
  running = set()

  def wrap(inner):
    def hooked(self, *a, **k):
      if id(self) in running or id(self) not in path_of:
        return inner(self, *a, **k)
      def run(*a, **k):
        running.add(id(self))
        try:
          return inner(self, *a, **k)
        finally:
          running.discard(id(self))
      return on_call(path_of[id(self)], run, a, k, self)
    return hooked

  token = _IN_NNX_CALL.set(True)
  with _PATCH_LOCK:
    originals = {cls: vars(cls)["__call__"] for cls in owners}
    try:
      for cls, inner in originals.items():
        cls.__call__ = wrap(inner)
      return model(*args, **kwargs)
    finally:
      for cls, original in originals.items():
        cls.__call__ = original
      _IN_NNX_CALL.reset(token)


def apply(apply_fn: Callable, hooks: Sequence[tuple]) -> Callable:
  """`apply_fn` with `hooks` ((pattern, fn), ...) on the modules whose path a pattern
  matches in full, in order for each module (the first innermost: what it returns is
  what the second sees). fn(output) -> output, or `Around(fn)` with fn(ModuleCall) ->
  output; a `(pattern, fn, group)` hook shares its carry with the hooks of its group
  (default: its own), fresh at every call."""
  compiled = [(re.compile(h[0]), h[1], h[2] if len(h) > 2 else i)
              for i, h in enumerate(hooks)]

  def wrapped(*args, **kwargs):
    carries = {}

    def on_call(path, run, a, k, module):
      chain = run
      for rx, fn, group in compiled:
        if rx.fullmatch(path):
          if isinstance(fn, Around):
            carry = carries.setdefault(group, {})
            chain = (lambda *a, fn=fn, inner=chain, carry=carry, **k:
                     fn.fn(ModuleCall(path, a, k, carry, inner, module)))
          else:
            chain = lambda *a, fn=fn, inner=chain, **k: fn(inner(*a, **k))
      return chain(*a, **k)

    with _active(on_call, lambda path: any(rx.fullmatch(path) for rx, _, _ in compiled)):
      return apply_fn(*args, **kwargs)
  return wrapped


def module_paths(apply_fn: Callable, *args, root: bool = False, **kwargs) -> list:
  """Every module path `apply_fn(*args)` calls, linen or NNX (traced for shapes only);
  `root`: with "", the root module's path, if a hook can reach it (a linen model's)."""
  seen = []

  def record(path, run, a, k, module):
    seen.append(path)
    return run(*a, **k)

  def run(*a):
    with _active(record, lambda path: True):
      return apply_fn(*a, **kwargs)
  jax.eval_shape(run, *args)
  return list(dict.fromkeys(p for p in seen if p or root))


def check(apply_fn: Callable, named_hooks: Sequence[tuple], *args, **kwargs) -> None:
  """`named_hooks`: ((method name, pattern, fn), ...) as `apply` takes them. Every pattern
  matches a module of the forward, and the hooked forward traces; else one ValueError
  naming the method, the pattern or module, and what is valid."""
  paths = module_paths(apply_fn, *args, root=True, **kwargs)
  if not [p for p in paths if p]:
    raise ValueError("module hooks need a forward made of Flax modules: linen (hooked "
                     "through nn.intercept_methods) or NNX called as hooks.call(model, "
                     "...); this forward calls no module that can be hooked.")
  for name, pattern, _ in named_hooks:
    rx = re.compile(pattern)
    if not any(rx.fullmatch(p) for p in paths):
      near = difflib.get_close_matches(pattern, [p for p in paths if p], n=5, cutoff=0.0)
      raise ValueError(f"compression method {name!r}: hook pattern {pattern!r} matches no "
                       f"module of the forward; nearest module paths: {near}.")
  names = list(dict.fromkeys(n for n, _, _ in named_hooks))
  for i, name in enumerate(names):  # one method at a time: its hooks work as a unit
    hooked = apply(apply_fn, [(p, f, n) for n, p, f in named_hooks if n in names[:i + 1]])
    pattern = "|".join(p for n, p, _ in named_hooks if n == name)
    try:
      jax.eval_shape(lambda *a: hooked(*a, **kwargs), *args)
    except HookError as e:
      raise HookError(f"compression method {name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 (whatever the next module raises on a bad shape)
      why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      raise ValueError(f"compression method {name!r}: the hook on {pattern!r} returns an "
                       f"output the rest of the forward cannot take ({type(e).__name__}: "
                       f"{why}); return what the next module accepts.") from None
