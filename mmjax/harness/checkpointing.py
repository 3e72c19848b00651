"""Checkpoints: one Orbax CheckpointManager in `<workdir>/checkpoints`, fixed resume rules.

A checkpoint holds the whole train state (params, optimizer state, compression state, step,
rng) and the data iterator's state (JSON), so a resumed run continues with exactly the
batches and numbers an uninterrupted run would have seen. Saves are asynchronous; Orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint as the latest.

Resume rules (`train.py`): a checkpoint in the workdir -> `config.init` (params only, from
another run's checkpoints) -> fresh initialisation. Before anything is restored, the saved
tree is compared with what the config builds; a mismatch is an error naming the paths.
`restore_latest` resumes from the newest readable step: one whose files are damaged is
moved aside to `<step>.corrupt` (never deleted) and the step before it is used.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

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


@contextlib.contextmanager
def _quiet_read_only():
  """Drop Orbax's 'Given directory is read only' warning, which every read-only manager
  logs however it is configured: opening a run to read it is not worth a warning."""
  def keep(record):
    return not record.getMessage().startswith("Given directory is read only")
  logger = logging.getLogger("absl")
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


@contextlib.contextmanager
def _quiet_closed_loop():
  """Reading damaged array data, Orbax abandons its other reads; TensorStore's callbacks
  then find the event loop closed and Python prints that as an 'Exception ignored'
  traceback. The step is reported (and set aside) by mmjax: drop just that one."""
  previous = sys.unraisablehook
  def hook(u):
    closed = isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
    if not closed:
      previous(u)
  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


def _short(e: BaseException, limit: int = 160) -> str:
  """An Orbax/TensorStore error in one short line (they carry the whole tensorstore spec)."""
  msg = str(e).split(" [tensorstore_spec=", 1)[0].splitlines()
  msg = msg[0] if msg else ""
  msg = msg if len(msg) <= limit else msg[:limit - 3] + "..."
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only:  # only options read_only accepts: others are reset with a warning each
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0,
                                             enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save)
    with _quiet_read_only() if read_only else contextlib.nullcontext():
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

  def restore_latest(self, abstract_state, *, what="checkpoint", log=print):
    """-> (step, state, data state) of the newest readable step, or None if there is none.

    A step whose files cannot be read (truncated or garbled by a crash or a full disk) is
    moved aside to `<step>.corrupt`, never deleted, and the next newest is tried, so a
    damaged last save costs the steps since the previous one rather than the run. A
    readable step that does not fit `abstract_state` raises CheckpointMismatchError."""
    with _quiet_closed_loop():
      return self._restore_latest(abstract_state, what, log)

  def _restore_latest(self, abstract_state, what, log):
    while (step := self.latest_step()) is not None:
      try:
        self._state_metadata(step)  # damaged metadata or arrays fail here...
      except (ValueError, OSError) as e:  # (incl. "no readable train state")
        self._set_aside(step, e, log)
        continue
      self.check_fits(step, abstract_state, what=what)  # ...a config mismatch here: raise
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # ...and damaged data here (Orbax may wrap it in a group)  # noqa: BLE001
        self._set_aside(step, e, log)
        continue
      return step, state, data_state
    return None

  def _set_aside(self, step, error, log):
    """Move an unreadable step to `<step>.corrupt[.N]` (process 0; all wait) and forget it."""
    src = os.path.join(self.directory, str(step))
    dst = src + ".corrupt"
    n = 0
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.corrupt.{n}"
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"mmjax:checkpoint_set_aside_{step}")
    log(f"[checkpoint] step {step} in {self.directory} is unreadable ({_short(error)}); "
        f"moved it to {os.path.basename(dst)} and trying the previous step")
    self._mngr.reload()

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


# ------------------------------------------------- the trainer's resume rules, in words

def check_resumable(ckpt_path: str, abstract_state, workdir: str) -> bool:
  """True if the workdir holds a checkpoint (its newest step must fit the config: the
  error says how to resume it or start anew), False if it holds none."""
  reader = Checkpointer(ckpt_path, read_only=True)
  try:
    step = reader.latest_step()
    if step is None:
      return False
    try:
      reader.check_fits(step, abstract_state, what="the workdir's checkpoint")
    except CheckpointMismatchError as e:
      raise CheckpointMismatchError(
          f"{e}. Resume it with the config it was trained with "
          f"({os.path.join(workdir, 'config.json')}), or use a new --workdir.") from None
    except (ValueError, OSError):  # unreadable: restore_latest sets it aside
      pass
    return True
  finally:
    reader.close()


def require_checkpoint(path: str, what: str) -> int:
  """The newest step under a run's workdir (or its checkpoints dir); none is an error."""
  reader = Checkpointer(checkpoint_dir(path), read_only=True)
  step = reader.latest_step()
  reader.close()
  if step is None:
    raise ValueError(f"{what}={path} holds no checkpoint; point it at an earlier run's "
                     "workdir or its checkpoints directory.")
  return step


def restore_params_from(path: str, abstract_params, step: int | None = None):
  """The params of a run's newest (or given) checkpoint, laid out like `abstract_params`."""
  reader = Checkpointer(checkpoint_dir(path), read_only=True)
  try:
    return reader.restore_params(reader.latest_step() if step is None else step,
                                 abstract_params)
  finally:
    reader.close()
