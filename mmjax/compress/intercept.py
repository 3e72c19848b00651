"""The matmuls of a traced forward that consume given parameters, found and changed.

`dots(apply_fn, paths, rewrite)` is `apply_fn` with every `dot_general` whose weight
operand is one of `paths` (or a dtype cast of it) computed by `rewrite(Dot) -> y` instead.
It works for any JAX model, because it reads the program rather than the model code:
`apply_fn(params, *args)` is traced to a jaxpr, the parameter leaves are matched to its
inputs by path, and the jaxpr is re-evaluated equation by equation (inside whatever
transformation is tracing: jit, grad), with the matched products rewritten. Flax linen
(`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`), NNX and plain functions all end in
`dot_general`; calls into nested `jit`s are followed. A matched parameter that no visible
`dot_general` consumes (used by a conv, or only inside a `scan`/`remat` body) is an error
naming it: the rewrite never silently does nothing.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax import lax
from jax.extend import core as jcore

from mmjax.compress.core import flatten

_CASTS = {"convert_element_type", "copy", "copy_p"}
_CALLS = {"pjit", "jit", "closed_call", "core_call"}


class Dot(NamedTuple):
  """One matched product: `x` the activation operand, `w` the weight (as the product sees
  it), the `dot_general` parameters, which side the weight is on, the output type."""
  path: str
  x: Any
  w: Any
  params: dict
  w_is_rhs: bool
  out_aval: Any

  @property
  def dims(self):
    return self.params["dimension_numbers"]

  def x_contract(self):
    (lc, rc), _ = self.dims
    return tuple(lc if self.w_is_rhs else rc)

  def w_contract(self):
    (lc, rc), _ = self.dims
    return tuple(rc if self.w_is_rhs else lc)

  def bind(self, x, w):
    """The original product with other operands."""
    args = (x, w) if self.w_is_rhs else (w, x)
    return lax.dot_general_p.bind(*args, **self.params)


def _bind(eqn, ins):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*ins, **params)
  return out if eqn.primitive.multiple_results else [out]


def _eval(jaxpr, consts, args, tags_in, rewrite, found):
  env, tags = {}, {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a, t in zip(jaxpr.invars, args, tags_in):
    env[v] = a
    if t is not None:
      tags[v] = t
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    tin = [None if isinstance(v, jcore.Literal) else tags.get(v) for v in eqn.invars]
    name = eqn.primitive.name
    out_tags = [None] * len(eqn.outvars)
    if not any(t is not None for t in tin):
      outs = _bind(eqn, ins)
    elif eqn.primitive is lax.dot_general_p and (tin[0] is None) != (tin[1] is None):
      w_is_rhs = tin[1] is not None
      path = tin[1] if w_is_rhs else tin[0]
      x, w = (ins[0], ins[1]) if w_is_rhs else (ins[1], ins[0])
      found.add(path)
      outs = [rewrite(Dot(path, x, w, dict(eqn.params), w_is_rhs, eqn.outvars[0].aval))]
    elif name in _CASTS:
      outs, out_tags = _bind(eqn, ins), [tin[0]]
    elif name in _CALLS and ("jaxpr" in eqn.params or "call_jaxpr" in eqn.params):
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      inner, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
      outs = _eval(inner, consts, ins, tin, rewrite, found)
    else:  # used by another op (an add, a conv, a loop body): left as it is
      outs = _bind(eqn, ins)
    for v, o, t in zip(eqn.outvars, outs, out_tags):
      env[v] = o
      if t is not None:
        tags[v] = t
  return [read(v) for v in jaxpr.outvars]


def unseen_message(what: str, unseen: Sequence[str]) -> str:
  return (f"{what}: {unseen[0]} (and {len(unseen) - 1} more) is consumed by no dot_general "
          "the interceptor can see (a conv kernel, a bias, or a matmul inside scan/remat); "
          "narrow the rule to matmul weights, e.g. '.*/kernel' of Dense/DenseGeneral/Einsum "
          "layers.")


def dots(apply_fn: Callable, paths: Sequence[str], rewrite: Callable[[Dot], Any],
         what: str = "activation rule") -> Callable:
  """`apply_fn(params, *args)` with the products consuming `paths` computed by `rewrite`."""
  wanted = set(paths)

  def wrapped(params, *args, **kwargs):
    fn = lambda p, *a: apply_fn(p, *a, **kwargs)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *args)
    flat = flatten(params)
    missing = sorted(wanted - set(flat))
    if missing:
      raise ValueError(f"{what}: parameters {missing[:4]} are not in the tree given to the "
                       "forward.")
    tags = [p if p in wanted else None for p in flat]
    leaves = jax.tree.leaves((params, args))
    tags = tags + [None] * (len(leaves) - len(tags))
    found = set()
    outs = _eval(closed.jaxpr, closed.consts, leaves, tags, rewrite, found)
    unseen = sorted(wanted - found)
    if unseen:
      raise ValueError(unseen_message(what, unseen))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


def observe(apply_fn: Callable, paths: Sequence[str], stat: Callable[[Dot], Any]):
  """-> f(params, *args) = {path: [stat of each use]}: statistics of the matched products'
  inputs (calibration), computed in the same traced forward."""
  def f(params, *args):
    seen = {}

    def record(d: Dot):
      seen.setdefault(d.path, []).append(stat(d))
      return d.bind(d.x, d.w)

    dots(apply_fn, paths, record, "calibration")(params, *args)
    return seen
  return f
