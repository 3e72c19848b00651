"""Checkpoints: one Orbax CheckpointManager in `<workdir>/checkpoints`, fixed resume rules.

A checkpoint holds the whole train state (params, optimizer state, compression state, step,
rng) and the data iterator's state (JSON), so a resumed run continues with exactly the
batches and numbers an uninterrupted run would have seen. Saves are asynchronous; Orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint as the latest.

Resume rules (`train.py`): a checkpoint in the workdir -> `config.init` (params only, from
another run's checkpoints) -> fresh initialisation. Before anything is restored, the saved
tree is compared with what the config builds; a mismatch is an error naming the paths.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the state the config builds."""


def checkpoint_dir(path: str) -> str:
  """A run's workdir or its checkpoints dir -> the checkpoints dir."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def _flat(tree):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                   for k in path)
    out[key] = leaf
  return out


def describe_mismatch(saved, expected, what: str, limit: int = 8) -> str | None:
  """None if `saved` (metadata or arrays) fits `expected` (abstract arrays), else why."""
  s, e = _flat(saved), _flat(expected)
  missing, extra = sorted(set(e) - set(s)), sorted(set(s) - set(e))
  order = lambda k: (not k.startswith("params"), k)  # params first: the telling part
  missing, extra = sorted(missing, key=order), sorted(extra, key=order)
  shapes = [f"{k}: saved {tuple(s[k].shape)}, config {tuple(e[k].shape)}"
            for k in sorted(set(s) & set(e), key=order)
            if tuple(getattr(s[k], "shape", ())) != tuple(e[k].shape)]
  if not (missing or extra or shapes):
    return None
  parts = []
  if shapes:
    parts.append(f"shape mismatches {shapes[:limit]}")
  if missing:
    parts.append(f"missing from the checkpoint {missing[:limit]}")
  if extra:
    parts.append(f"not in the config {extra[:limit]}")
  return f"{what} does not fit the config: " + "; ".join(parts)


class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def _state_metadata(self, step):
    meta = self._mngr.item_metadata(step)["state"]
    meta = getattr(meta, "tree", meta)  # orbax's TreeMetadata wraps the nested dict
    if meta is None:
      raise CheckpointMismatchError(f"checkpoint {self.directory} (step {step}) has no readable "
                                    "train state; it is not an mmjax checkpoint or is damaged.")
    return meta

  def check_fits(self, step, abstract_state, what="checkpoint"):
    meta = self._state_metadata(step)
    why = describe_mismatch(meta, abstract_state,
                            f"{what} {self.directory} (step {step})")
    if why:
      raise CheckpointMismatchError(why)

  def save(self, step: int, state, data_state: dict | None):
    self._mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})),
        force=True)

  def restore(self, step, abstract_state):
    """-> (state laid out like `abstract_state` (with its shardings), data state dict)."""
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], dict(out["data"] or {})

  def check_params_fit(self, step, abstract_params, what="params in"):
    meta = self._state_metadata(step)
    saved = meta["params"] if isinstance(meta, dict) else getattr(meta, "params")
    why = describe_mismatch(saved, abstract_params, f"{what} {self.directory} (step {step})")
    if why:
      raise CheckpointMismatchError(why)

  def restore_params(self, step, abstract_params):
    """Only the params subtree (for `config.init` or a teacher); shapes checked first."""
    self.check_params_fit(step, abstract_params)
    params = self.restore_local(step)["params"]
    return jax.tree.map(lambda a, x: jax.device_put(np.asarray(a), x.sharding), params,
                        abstract_params)

  def restore_local(self, step):
    """The saved train state as nested dicts of arrays on this process's first device,
    whatever topology saved it (for analysis, export, tests)."""
    device = jax.local_devices()[0]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(device)),
        self._state_metadata(step))
    return self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()
