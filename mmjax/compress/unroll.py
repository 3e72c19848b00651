"""Stacked layers (`nn.scan`, `nnx.scan`, `lax.scan` over layers) seen as separate layers,
for calibration.

A scanned model keeps each layer's parameters stacked (`[depth, in, out]`) and runs one
layer body inside a `scan` primitive that slices the stack (its `xs`). Calibration needs each
layer's own statistics, and sequential calibration needs layer l's inputs from the forward
through the already compressed layers < l, exactly as for an unrolled model. So for
calibration the scan is unrolled: `unroll(apply_fn, params, batch, paths)` gives
`apply_fn(vparams, batch)` over a flat dict in which every selected stacked leaf `p` is
replaced by its layers `p[0]`, `p[1]`, ... (virtual leaves), and the scan's body is run once
per layer with layer l reading `p[l]` directly (the other `xs`, e.g. stacked LayerNorm
scales, are sliced). `remat`/`checkpoint` bodies and nested jits are inlined (the same
values; only the memory plan differs, which calibration does not need). Everything
downstream (the interceptor, `passes`, `staged`, `stats`) then sees an ordinary unrolled
program whose products consume ordinary leaves; each scan iteration is one block
(`block_of`) for sequential calibration.

Cost: the calibration forward is compiled unrolled (depth copies of the body: compile time
grows with depth); sequential calibration runs, as for an unrolled model, about two
forwards in all (`staged`). The compressed model itself keeps its scan.

Not supported, each a one-line error naming the parameter: a stacked leaf read other than
as a scan's per-layer input (a scan const, a dynamic slice, a while loop or cond), and
scans nested inside the layer scan over selected parameters.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from mmjax.compress.core import flatten
from mmjax.compress.intercept import _CALLS, _REMAT  # the primitives both walks inline
_CASTS = {"convert_element_type", "copy", "copy_p"}


def layer(path: str, i: int) -> str:
  """The virtual path of layer `i` of the stacked leaf `path`."""
  return f"{path}[{i}]"


_LAYER = re.compile(r"(.*)\[(\d+)\]")


def base(vpath: str) -> tuple:
  """`p[3]` -> (p, 3); any other path -> (path, None)."""
  m = _LAYER.fullmatch(vpath)
  return (m.group(1), int(m.group(2))) if m else (vpath, None)


class _Stack(NamedTuple):
  """A selected stacked leaf, not materialized: only a scan's xs may read it (after
  dtype casts, applied to each layer)."""
  path: str
  casts: tuple = ()


def _sub(eqn):
  sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if sub is None:
    return None, []
  return (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])


def scanned(closed, tags: Sequence) -> tuple:
  """-> ({path: scan site} for the tagged inputs of `closed` that a scan takes as
  per-layer inputs (xs), directly or through casts and nested jits / remat (site: the
  scan's number in the order met), whether a tagged input reaches a remat body)."""
  out, sites, remat = {}, iter(range(1 << 30)), []

  def walk(jaxpr, tin):
    tag = {v: t for v, t in zip(jaxpr.invars, tin) if t is not None}
    for eqn in jaxpr.eqns:
      ts = [None if isinstance(v, jcore.Literal) else tag.get(v) for v in eqn.invars]
      name = eqn.primitive.name
      if not any(t is not None for t in ts):
        continue
      inner, _ = _sub(eqn)
      if name in _CASTS:
        tag[eqn.outvars[0]] = ts[0]
      elif name == "scan":
        nx = eqn.params["num_consts"] + eqn.params["num_carry"]
        site = next(sites)
        for t in ts[nx:]:
          if t is not None:
            out.setdefault(t, site)
      elif (name in _CALLS or name in _REMAT) and inner is not None:
        remat.append(name in _REMAT)
        walk(inner, ts)

  walk(closed.jaxpr, list(tags))
  return out, any(remat)


class Unrolled(NamedTuple):
  apply_fn: Callable  # apply_fn(vparams, batch), vparams a flat dict
  params: dict        # the flat parameters, each stacked selected leaf replaced by its layers
  paths: list         # the selected paths, likewise
  layers: dict        # stacked path -> [its virtual paths, layer by layer]
  block_of: dict      # virtual path -> its block: one scan iteration


def unroll(apply_fn: Callable, params, batch, paths: Sequence[str], what: str = "calibration",
           closed=None):
  """`Unrolled` for the selected `paths` that scans take as per-layer inputs (or that remat
  bodies read: inlined); None when there are none (the forward is then used as it is).
  `closed`: the jaxpr of apply_fn(params, batch) if already traced."""
  flat = flatten(params)
  closed = closed or jax.make_jaxpr(apply_fn)(params, batch)
  n = len(jax.tree.leaves((params, batch)))
  wanted = set(paths)
  tags = [p if p in wanted else None for p in flat] + [None] * (n - len(flat))
  sites, remat = scanned(closed, tags)
  if not sites and not remat:
    return None
  depth = {p: flat[p].shape[0] for p in sites}
  layers = {p: [layer(p, i) for i in range(depth[p])] for p in sites}
  vparams = {}
  for p, w in flat.items():
    if p in sites:
      vparams.update({v: w[i] for i, v in enumerate(layers[p])})
    else:
      vparams[p] = w
  vpaths = [v for p in paths for v in (layers[p] if p in sites else [p])]
  block_of = {v: f"scan {sites[p]}, layer {i}" for p in sites for i, v in enumerate(layers[p])}
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                        params)
  order = list(flat)

  def apply_v(vp, batch):
    closed = jax.make_jaxpr(apply_fn, return_shape=True)(shapes, batch)
    closed, out_shape = closed
    leaves = [_Stack(p) if p in sites else vp[p] for p in order]
    leaves += jax.tree.leaves(batch)
    virt = {p: [vp[v] for v in layers[p]] for p in sites}
    outs = _run(closed.jaxpr, closed.consts, leaves, virt, what)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return Unrolled(apply_v, vparams, vpaths, layers, block_of)


def _bind(eqn, ins):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*ins, **params)
  return out if eqn.primitive.multiple_results else [out]


def _refuse(x: _Stack, name: str, what: str):
  raise ValueError(
      f"{what}: {x.path} is a stacked parameter read by {name}, not only sliced layer by "
      "layer as a scan's per-layer input (xs); only that use is supported: leave it out of "
      "the rule.")


def _run(jaxpr, consts, args, virt: dict, what: str):
  """Evaluate `jaxpr`, unrolling the scans that read selected stacked leaves and inlining
  jits and remat."""
  env = {}
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    inner, inner_consts = _sub(eqn)
    stacked = [x for x in ins if isinstance(x, _Stack)]
    if name in _CASTS and stacked:
      outs = [stacked[0]._replace(casts=stacked[0].casts + (eqn,))]
    elif name == "scan" and stacked:
      outs = _scan(eqn, ins, virt, what)
    elif (name in _CALLS or name in _REMAT) and inner is not None:
      outs = _run(inner, inner_consts, ins, virt, what)
    elif stacked:
      _refuse(stacked[0], name, what)
    else:
      outs = _bind(eqn, ins)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _scan(eqn, ins, virt: dict, what: str):
  p = eqn.params
  nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
  consts, carry, xs = ins[:nc], list(ins[nc:nc + nk]), ins[nc + nk:]
  for x in consts + carry:
    if isinstance(x, _Stack):
      _refuse(x, "a scan as a whole (a const or carry)", what)
  body = p["jaxpr"]
  ys = [None] * length
  for i in (reversed(range(length)) if p["reverse"] else range(length)):
    xi = [_layer_of(x, i, virt) if isinstance(x, _Stack) else lax.index_in_dim(x, i, 0, False)
          for x in xs]
    outs = _run(body.jaxpr, body.consts, consts + carry + xi, virt, what)
    carry, ys[i] = outs[:nk], outs[nk:]
  return carry + [jnp.stack(col) for col in zip(*ys)]


def _layer_of(x: _Stack, i: int, virt: dict):
  w = virt[x.path][i]
  for eqn in x.casts:
    w = _bind(eqn, [w])[0]
  return w
