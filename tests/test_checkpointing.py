"""Checkpointer: quiet read-only opening, and resuming past a damaged newest checkpoint."""
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.harness import checkpointing


def _state(step):
  return {"params": {"w": jnp.arange(12.0).reshape(3, 4) * step,
                     "b": jnp.full(4, step, jnp.float32)}, "step": step}


def _abstract(w_shape=(3, 4)):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = jax.eval_shape(lambda: {"params": {"w": jnp.zeros(w_shape), "b": jnp.zeros(4)},
                                 "step": 0})
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Steps 1, 2, 3 of a small state, each with its data iterator's state."""
  directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"iterator": {"position": step * 16}})
  ckpt.close()
  return directory


@pytest.fixture
def copy(saved, tmp_path):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(saved, directory)
  return directory


def _damage(path, how):
  if how == "truncate":
    os.truncate(path, os.path.getsize(path) // 2)
  else:  # garble: bytes in the middle overwritten
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3:len(data) // 3 + 8] = b"\xff" * 8
    open(path, "wb").write(bytes(data))


def _files(directory):
  return {os.path.relpath(os.path.join(r, f), directory): open(os.path.join(r, f), "rb").read()
          for r, _, fs in os.walk(directory) for f in fs}


def _assert_step(out, step):
  got_step, state, data = out
  assert got_step == step
  np.testing.assert_array_equal(state["params"]["w"], np.asarray(_state(step)["params"]["w"]))
  np.testing.assert_array_equal(state["params"]["b"], np.asarray(_state(step)["params"]["b"]))
  assert int(state["step"]) == step
  assert data == {"iterator": {"position": step * 16}}


@pytest.mark.parametrize("target", ["state/_METADATA", "state/d", "data/metadata"])
@pytest.mark.parametrize("how", ["truncate", "garble"])
@pytest.mark.parametrize("read_only", [True, False])  # a reader, or the run's own manager
def test_unreadable_newest_step_is_moved_aside_and_the_previous_restored(copy, target, how,
                                                                         read_only):
  # the train state's metadata (JSON), its array data (OCDBT), the data iterator's JSON
  step_dir = os.path.join(copy, "3")
  if target == "state/d":  # the largest array data file
    d = os.path.join(step_dir, "state", "d")
    target = os.path.join("state", "d", max(os.listdir(d),
                                            key=lambda f: os.path.getsize(os.path.join(d, f))))
  _damage(os.path.join(step_dir, target), how)
  damaged = _files(step_dir)
  logs = []
  ckpt = checkpointing.Checkpointer(copy, read_only=read_only)
  _assert_step(ckpt.restore_latest(_abstract(), log=logs.append), 2)
  assert ckpt.latest_step() == 2
  ckpt.close()
  assert len(logs) == 1 and "step 3" in logs[0] and "unreadable" in logs[0], logs
  assert "3.corrupt" in logs[0] and "\n" not in logs[0] and len(logs[0]) < 400, logs
  assert not os.path.exists(step_dir)
  assert _files(os.path.join(copy, "3.corrupt")) == damaged  # moved, byte for byte
  reopened = checkpointing.Checkpointer(copy, read_only=True)
  assert reopened.all_steps() == [1, 2]  # <step>.corrupt is no step
  reopened.close()


def test_every_step_unreadable_gives_none_and_keeps_every_file(copy):
  os.makedirs(os.path.join(copy, "3.corrupt"))  # an earlier set-aside: not overwritten
  for step in (1, 2, 3):
    _damage(os.path.join(copy, str(step), "state", "_METADATA"), "truncate")
  logs = []
  ckpt = checkpointing.Checkpointer(copy, read_only=True)
  assert ckpt.restore_latest(_abstract(), log=logs.append) is None
  ckpt.close()
  assert [("step 3" in logs[0]), ("step 2" in logs[1]), ("step 1" in logs[2])] == [True] * 3
  assert sorted(os.listdir(copy)) == ["1.corrupt", "2.corrupt", "3.corrupt", "3.corrupt.1"]
  assert os.listdir(os.path.join(copy, "3.corrupt.1"))


def test_a_readable_step_that_does_not_fit_is_still_a_mismatch(copy):
  ckpt = checkpointing.Checkpointer(copy, read_only=True)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="params/w: saved"):
    ckpt.restore_latest(_abstract(w_shape=(3, 5)), log=lambda *_: None)
  ckpt.close()
  assert sorted(os.listdir(copy)) == ["1", "2", "3"]  # nothing moved


def test_no_checkpoint_gives_none(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  assert ckpt.restore_latest(_abstract(), log=pytest.fail) is None
  ckpt.close()


def test_read_only_opening_logs_no_warnings(saved, caplog):
  with caplog.at_level(logging.INFO):
    ckpt = checkpointing.Checkpointer(saved, read_only=True)
    _assert_step(ckpt.restore_latest(_abstract(), log=pytest.fail), 3)
    ckpt.close()
  loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not loud, loud
  assert not logging.getLogger("absl").filters  # the filter is scoped to construction
