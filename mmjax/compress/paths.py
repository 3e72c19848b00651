"""Parameter paths: any pytree as a flat `{"a/b/kernel": leaf}` dict and back, the paths a
rule's regex matches, and the shapes and dtypes of leaves (what `accepts` decides by)."""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Flat = dict  # {path: array}


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree) -> Flat:
  """{"a/b/kernel": leaf} for any pytree (dict keys, attributes and indices joined by /)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_str(k) for k in path): leaf for path, leaf in leaves}


def unflatten(flat: Flat, like=None):
  """The tree `like` (its structure) with leaves from `flat`; without `like`, nested dicts."""
  if like is not None:
    paths = list(flatten(like))
    return jax.tree_util.tree_structure(like).unflatten([flat[p] for p in paths])
  out = {}
  for path, leaf in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


def match_paths(pattern: str, paths: Sequence[str], what: str = "rule") -> list:
  """Paths that fully match `pattern`; none is an error that lists the paths."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}.") from None
  hits = [p for p in paths if rx.fullmatch(p)]
  if not hits:
    listing = "\n  ".join(paths)
    raise ValueError(f"{what} {pattern!r} matches no parameter (patterns must match a whole "
                     f"path). The parameter paths are:\n  {listing}")
  return hits


def leaf_specs(leaves) -> dict:
  """{path: jax.ShapeDtypeStruct} of a flat dict of arrays (or tracers, or structs), or of
  `{path: shape}` (a shape alone is taken as float32: what a model's config gives)."""
  out = {}
  for p, x in leaves.items():
    if isinstance(x, (tuple, list)):
      out[p] = jax.ShapeDtypeStruct(tuple(int(d) for d in x), jnp.float32)
    else:
      dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
      out[p] = jax.ShapeDtypeStruct(tuple(np.shape(x)), dtype)
  return out
