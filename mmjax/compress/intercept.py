"""The products of a traced forward that consume given parameters, found and changed.

`dots(apply_fn, paths, rewrite)` is `apply_fn` with every `dot_general` whose weight
operand is one of `paths` (or a dtype cast of it) computed by `rewrite(Dot) -> y` instead;
with `convs=True`, every `conv_general_dilated` whose kernel is one of them too
(`rewrite(Conv) -> y`: the post-training statistics read a conv's input patches).
It works for any JAX model, because it reads the program rather than the model code:
`apply_fn(params, *args)` is traced to a jaxpr, the parameter leaves are matched to its
inputs by path, and the jaxpr is re-evaluated equation by equation (inside whatever
transformation is tracing: jit, grad), with the matched products rewritten. Flax linen
(`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv`), NNX and plain functions all end in
`dot_general` or `conv_general_dilated`; calls into nested `jit`s are followed, and so are
`remat`/`checkpoint` bodies (rewritten inside a `jax.checkpoint` with the same policy).
Stacked layers: `dots` follows a `scan` that takes matched parameters as per-layer inputs
(xs) into its body, where each product sees one layer's slice; the scan is rebuilt with
the rewritten body and the iteration number as an extra input, and `Dot.layer` /
`Conv.layer` carry it to the rewrite (per-layer state is indexed with it: the compressed
model keeps its scan). `observe` (statistics that leave the forward) does not; calibration
unrolls scans first (`unroll`). A matched parameter that no visible product consumes (a
bias, a conv kernel where convs are not handled, a weight read inside a while or cond body)
is an error naming it, what consumes it, and a rule that leaves it out (generated from the
model's paths and checked against them): the rewrite never silently does nothing.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from mmjax.compress.core import flatten

_CASTS = {"convert_element_type", "copy", "copy_p"}
_CALLS = {"pjit", "jit", "closed_call", "core_call"}
_REMAT = {"checkpoint", "remat", "remat2"}
_OPAQUE = {"scan", "while", "cond", "checkpoint", "remat", "remat2", "custom_vjp_call",
           "custom_vjp_call_jaxpr", "custom_jvp_call", "shard_map", "xla_pmap"}


class Dot(NamedTuple):
  """One matched product: `x` the activation operand, `w` the weight (as the product sees
  it), the `dot_general` parameters, which side the weight is on, the output type."""
  path: str
  x: Any
  w: Any
  params: dict
  w_is_rhs: bool
  out_aval: Any
  layer: Any = None  # inside a scan over stacked layers: the iteration (a traced int)

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


class Conv(NamedTuple):
  """One matched convolution: `x` its input (lhs), `w` the kernel (rhs) as the conv sees
  it, the `conv_general_dilated` parameters (dimension numbers, strides, padding,
  dilations, groups), the output type."""
  path: str
  x: Any
  w: Any
  params: dict
  out_aval: Any
  layer: Any = None  # inside a scan over stacked layers: the iteration (a traced int)

  @property
  def dims(self):
    return self.params["dimension_numbers"]  # ConvDimensionNumbers(lhs, rhs, out spec)

  @property
  def w_is_rhs(self):
    return True  # the kernel is always the conv's rhs (`weight_use`)

  def w_contract(self):
    """The kernel's contracted axes, ascending: every axis but its output feature axis."""
    out_axis = self.dims.rhs_spec[0]
    return tuple(a for a in range(len(self.dims.rhs_spec)) if a != out_axis)

  def bind(self, x, w):
    return lax.conv_general_dilated_p.bind(x, w, **self.params)


def weight_use(eqn, tags, convs: bool = True):
  """-> (path, index of the weight operand) if `eqn` is a product that consumes a matched
  parameter as its weight: a `dot_general` with exactly one matched operand, or (`convs`)
  a `conv_general_dilated` whose kernel is matched and input is not; else None."""
  if eqn.primitive is lax.dot_general_p and (tags[0] is None) != (tags[1] is None):
    return (tags[1], 1) if tags[1] is not None else (tags[0], 0)
  if (convs and eqn.primitive is lax.conv_general_dilated_p and tags[1] is not None
      and tags[0] is None):
    return tags[1], 1
  return None


def record(eqn, path: str, w_index: int, x, w):
  """The `Dot` or `Conv` of a product `weight_use` matched, with operands `x` and `w`."""
  if eqn.primitive is lax.conv_general_dilated_p:
    return Conv(path, x, w, dict(eqn.params), eqn.outvars[0].aval)
  return Dot(path, x, w, dict(eqn.params), w_index == 1, eqn.outvars[0].aval)


def _bind(eqn, ins):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*ins, **params)
  return out if eqn.primitive.multiple_results else [out]


def _eval(jaxpr, consts, args, tags_in, rewrite, found, users, convs, scans=False):
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
    elif (use := weight_use(eqn, tin, convs)) is not None:
      path, wi = use
      found.add(path)
      outs = [rewrite(record(eqn, path, wi, ins[1 - wi], ins[wi]))]
    elif name in _CASTS:
      outs, out_tags = _bind(eqn, ins), [tin[0]]
    elif name in _CALLS and ("jaxpr" in eqn.params or "call_jaxpr" in eqn.params):
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      inner, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
      outs = _eval(inner, consts, ins, tin, rewrite, found, users, convs, scans)
    elif name in _REMAT and "jaxpr" in eqn.params:  # kept a checkpoint; inlined (observe)
      f = lambda *a, e=eqn, t=tin: _eval(e.params["jaxpr"], [], a, t, rewrite, found, users,
                                         convs, scans)
      outs = (jax.checkpoint(f, prevent_cse=eqn.params.get("prevent_cse", True),
                             policy=eqn.params.get("policy")) if scans else f)(*ins)
    elif (name == "scan" and scans is True and not any(tin[:eqn.params["num_consts"]
                                                   + eqn.params["num_carry"]])):
      outs = _scan(eqn, ins, tin, rewrite, found, users, convs)
    else:  # used by another op (an add, a conv, a loop body): left as it is
      for t in tin:
        if t is not None:
          users.setdefault(t, name)
      outs = _bind(eqn, ins)
    for v, o, t in zip(eqn.outvars, outs, out_tags):
      env[v] = o
      if t is not None:
        tags[v] = t
  return [read(v) for v in jaxpr.outvars]


def _scan(eqn, ins, tin, rewrite, found, users, convs):
  """A scan whose xs carry matched (stacked) parameters, rebuilt with the rewritten body:
  the iteration number rides along as an extra xs and reaches the rewrite as `.layer`.
  A scan nested in it over matched parameters is not followed (an error names them)."""
  p = eqn.params
  nc, nk, n = p["num_consts"], p["num_carry"], p["length"]
  consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
  body, tags = p["jaxpr"], [None] * (nc + nk) + list(tin[nc + nk:])

  def step(c, x):
    i, xi = x
    outs = _eval(body.jaxpr, body.consts, list(consts) + list(c) + list(xi), tags,
                 lambda d: rewrite(d._replace(layer=i)), found, users, convs, "inner")
    return outs[:nk], outs[nk:]

  c, ys = lax.scan(step, list(carry), (jnp.arange(n), list(xs)), length=n,
                   reverse=p["reverse"], unroll=p["unroll"])
  return list(c) + list(ys)


# ------------------------------------------------------- rules suggested by the errors

def _span(paths: Sequence[str]) -> str:
  """prefix.*suffix: the common start and end of `paths`, a regex matching all of them."""
  if len(paths) == 1:
    return re.escape(paths[0])
  pre = os.path.commonprefix(list(paths))
  suf = os.path.commonprefix([p[::-1] for p in paths])[::-1]
  suf = suf[len(suf) - min(len(suf), min(map(len, paths)) - len(pre)):]
  return re.escape(pre) + ".*" + re.escape(suf)


def _by_part(paths: Sequence[str]) -> str | None:
  """Per '/'-separated part: the part itself where all paths agree, else its common start
  and end around [^/]*. None when the paths have different depths."""
  parts = [p.split("/") for p in paths]
  if len({len(q) for q in parts}) != 1:
    return None
  out = []
  for column in zip(*parts):
    if len(set(column)) == 1:
      out.append(re.escape(column[0]))
      continue
    pre = os.path.commonprefix(list(column))
    suf = os.path.commonprefix([c[::-1] for c in column])[::-1]
    suf = suf[len(suf) - min(len(suf), min(map(len, column)) - len(pre)):]
    out.append(re.escape(pre) + "[^/]*" + re.escape(suf))
  return "/".join(out)


def rule_for(keep: Sequence[str], drop: Sequence[str], universe: Sequence[str]) -> str | None:
  """A regex that fully matches every path of `keep` and no other path of `universe`
  (`drop`: the paths to leave out, which it is built to exclude), as short as the
  candidates allow: a pattern spanning keep + drop (what the rule matched) with a
  negative lookahead `(?!(?:...)$)` for what must be left out, each dropped leaf by its last
  part where no kept path shares it (`(?:.*/)?bias`), else by its full path, and any other
  path of `universe` the pattern would take. Checked against `universe` (the exact
  alternation of `keep` is the fallback). None if keep is empty."""
  keep = sorted(set(keep))
  if not keep:
    return None
  universe = set(universe) | set(keep) | set(drop)
  kept = set(keep)
  matched = sorted(kept | set(drop))
  last = lambda p: p.rsplit("/", 1)[-1]
  kept_last = {last(p) for p in keep}
  base_terms = sorted({"(?:.*/)?" + re.escape(last(p)) for p in drop if last(p) not in kept_last}
                      | {re.escape(p) for p in drop if last(p) in kept_last})

  def make(base, terms):
    return (f"(?!(?:{'|'.join(terms)})$)" if terms else "") + base

  def works(rx):
    c = re.compile(rx)
    return {p for p in universe if c.fullmatch(p)} == kept

  candidates = []
  for base in {_span(matched), _by_part(matched), _span(keep), _by_part(keep)} - {None}:
    c = re.compile(make(base, base_terms))
    extra = sorted(p for p in universe - kept if c.fullmatch(p))
    candidates.append(make(base, base_terms + [re.escape(p) for p in extra]))
  good = sorted((rx for rx in candidates if works(rx)), key=lambda rx: (len(rx), rx))
  return good[0] if good else "|".join(re.escape(p) for p in keep)


def quoted(rx: str) -> str:
  """A regex as a Python raw string literal, to copy into a rule."""
  return f'r"{rx}"' if "'" in rx else f"r'{rx}'"


def more(paths: Sequence[str]) -> str:
  """'a (and 3 more)': the first of `paths` and how many others."""
  return f"{paths[0]} (and {len(paths) - 1} more)"


def unseen_message(what: str, unseen: Sequence[str], matched: Sequence[str],
                   universe: Sequence[str], users: dict | None = None) -> str:
  """One line: which matched parameters no visible product consumes, what does read them,
  and a rule (checked against `universe`, the model's paths) that leaves them out."""
  users = users or {}
  unseen = sorted(unseen)
  read_by = Counter(users.get(p, "nothing visible") for p in unseen)
  why = "read by " + ", ".join(f"{n} {u}" for u, n in sorted(read_by.items()))
  if "conv_general_dilated" in read_by:
    why += ("; convolutions are seen only by the post-training weight methods (GPTQ, "
            "SparseGPT, Wanda, AWQ, RTN)")
  if set(read_by) & _OPAQUE:
    why += ("; products inside while/cond bodies and scans nested in a layer scan are not "
            "supported; stacked layers under one scan are, for weight quantization, GPTQ, "
            "SparseGPT, Wanda, AWQ, RTN, SmoothQuant and activation inputs, with "
            "contract=layout.stacked(...)")
  rx = rule_for(sorted(set(matched) - set(unseen)), unseen, universe)
  fix = (f"a rule that leaves them out: {quoted(rx)}." if rx is not None else
         "no parameter of the rule is, so drop the rule.")
  return (f"{what}: {more(unseen)} is consumed by no dot_general the interceptor can see "
          f"({why}); {fix}")


# ------------------------------------------------------------------ the entry points

def dots(apply_fn: Callable, paths: Sequence[str], rewrite: Callable[[Dot], Any],
         what: str = "activation rule", convs: bool = False, scans: bool = True) -> Callable:
  """`apply_fn(params, *args)` with the products consuming `paths` computed by `rewrite`
  (`convs`: convolutions too, as `Conv` records; `scans`: inside scans over stacked layers
  too, with `.layer` set)."""
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
    found, users = set(), {}
    outs = _eval(closed.jaxpr, closed.consts, leaves, tags, rewrite, found, users, convs,
                 scans)
    unseen = sorted(wanted - found)
    if unseen:
      raise ValueError(unseen_message(what, unseen, sorted(wanted), list(flat), users))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


def observe(apply_fn: Callable, paths: Sequence[str], stat: Callable[[Dot], Any],
            convs: bool = False, what: str = "calibration"):
  """-> f(params, *args) = {path: [stat of each use]}: statistics of the matched products'
  inputs (calibration), computed in the same traced forward (`convs`: convolutions'
  uses too, as `Conv` records)."""
  def f(params, *args):
    seen = {}

    def rec(d):
      seen.setdefault(d.path, []).append(stat(d))
      return d.bind(d.x, d.w)

    dots(apply_fn, paths, rec, what, convs, scans=False)(params, *args)
    return seen
  return f
