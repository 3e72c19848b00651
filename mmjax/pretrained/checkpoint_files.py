"""Reading checkpoints users have, and mapping their names onto an mmjax params tree.

A family describes its checkpoint as a list of `Tensor(source_name, target_path, convert)`
entries; `assemble` reads them into the family's abstract params and, before anything is
built, names every missing, unexpected and mis-shaped key at once (a checkpoint of another
family or size fails with all of them, not the first). Files are read from disk only.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded into the model; the message names file and keys."""


class Tensor(NamedTuple):
  source: str                     # the checkpoint's name, e.g. "vit.layernorm.weight"
  target: str                     # the params path, e.g. "norm/scale"
  convert: Optional[Callable] = None  # numpy array -> the layout the module stores


def read_safetensors(path: str) -> dict:
  """{name: np.ndarray} of a .safetensors file (float32 for floating tensors; bfloat16 and
  float16 are widened, as the modules compute in float32)."""
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint {path}: no such file; give the path of a .safetensors "
                          "file (nothing is downloaded).")
  try:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
  except ImportError as e:  # pragma: no cover - a runtime dependency
    raise CheckpointError(f"reading {path} needs the safetensors package ({e}): pip install "
                          "safetensors.") from None
  try:
    raw = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({e}); it "
                          "may be truncated: download it again.") from None
  except Exception as e:  # ml_dtypes (bfloat16) tensors come through another path
    if "bfloat16" not in str(e) and "bf16" not in str(e).lower():
      raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})."
                            ) from None
    raw = _read_bf16(path)
  return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
          for k, v in raw.items()}


def _read_bf16(path):
  from safetensors import safe_open
  out = {}
  with safe_open(path, framework="flax") as f:
    for k in f.keys():
      out[k] = np.asarray(f.get_tensor(k), np.float32)
  return out


def check_format(path: str, module: str, npz: bool = False) -> None:
  """A checkpoint path the family reads: `.safetensors` (and big_vision `.npz`)."""
  if str(path).endswith(".safetensors") or (npz and str(path).endswith(".npz")):
    return
  raise CheckpointError(f"checkpoint {path}: {module} reads Hugging Face .safetensors"
                        f"{' and big_vision .npz' if npz else ''} files.")


def assemble(tensors: dict, spec: list, abstract: dict, what: str, *, ignore=()) -> dict:
  """The flat `{path: array}` of `abstract` (a flat `{path: ShapeDtypeStruct}`) from the
  checkpoint's `tensors` by `spec`; every problem named in one error."""
  import re
  by_source = {t.source: t for t in spec}
  missing = sorted(t.source for t in spec if t.source not in tensors)
  unexpected = sorted(k for k in tensors if k not in by_source and not any(
      re.fullmatch(p, k) for p in ignore))
  out, shapes = {}, []
  for t in spec:
    if t.source not in tensors:
      continue
    value = np.asarray(tensors[t.source])
    value = t.convert(value) if t.convert is not None else value
    want = abstract[t.target]
    if tuple(value.shape) != tuple(want.shape):
      shapes.append(f"{t.source}: {tuple(tensors[t.source].shape)} in the checkpoint, "
                    f"{tuple(want.shape)} for {t.target}")
      continue
    out[t.target] = value.astype(want.dtype)
  unfilled = sorted(set(abstract) - {t.target for t in spec})
  some = lambda items, n, sep: sep.join(items[:n] + (["..."] if len(items) > n else []))
  problems = [f"{len(items)} {kind} ({some(items, n, sep)})"
              for kind, items, n, sep in (("missing", missing, 4, ", "),
                                          ("unexpected", unexpected, 4, ", "),
                                          ("mis-shaped", shapes, 3, "; ")) if items]
  if unfilled:
    problems.append(f"{len(unfilled)} parameters of the model that no key fills "
                    f"({', '.join(unfilled[:4])})")
  if problems:
    raise CheckpointError(f"{what}: the checkpoint does not fit the configured model: "
                          + "; ".join(problems) + ". Is it a checkpoint of this family and "
                          "size? Set config.model to the checkpoint's configuration.")
  return out


def to_params(tensors: dict, spec: list, abstract, what: str, *, ignore=(), new=()):
  """`assemble` onto a nested params tree shaped like `abstract`, as jax arrays. Leaves
  under a prefix in `new` (a task head no checkpoint has) are not looked for: they start
  at zero, so a fresh head's first outputs are 0 and the pretrained encoder decides."""
  import jax.numpy as jnp
  from mmjax.compress import flatten, unflatten
  flat_abstract = flatten(abstract)
  fresh = {p: x for p, x in flat_abstract.items() if new and p.startswith(tuple(new))}
  flat = assemble(tensors, spec, {p: x for p, x in flat_abstract.items() if p not in fresh},
                  what, ignore=ignore)
  flat.update({p: np.zeros(x.shape, x.dtype) for p, x in fresh.items()})
  return unflatten({k: jnp.asarray(v) for k, v in flat.items()}, abstract)


def fresh_head(args: dict, has_head: bool) -> bool:
  """A new head (at zero) when the model has one and the checkpoint has none, or
  `new_head` asks for one (fine-tuning on other classes than the checkpoint's)."""
  return bool(args["num_classes"]) and (bool(args.get("new_head")) or not has_head)
