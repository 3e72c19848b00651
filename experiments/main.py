"""Run one experiment: a config file plus flags.

  python -m experiments.main --config=experiments/configs/dense.py[:tiny] --workdir=DIR \
      [--config.optimizer.lr=3e-4 ...]

Any config field can be overridden with --config.<path>=<value> (type-checked by
ml_collections). Config errors are reported before anything is compiled or written; a
workdir that already holds a checkpoint is resumed.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:args]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and config.json go")
flags.mark_flags_as_required(["config", "workdir"])
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _config_path(argv):
  """The file part of --config in `argv` (`--config=f[:args]` or `--config f`), or None."""
  for i, a in enumerate(argv[1:], 1):
    if a == "--":
      break
    if a.startswith(("--config=", "-config=")):
      return a.partition("=")[2].split(":", 1)[0]
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def parse_flags(argv):
  """absl's parsing, but a missing config file is one line, not ml_collections' traceback
  (which it raises late, on first use of the config, or from an override flag)."""
  path = _config_path(argv)
  if path and not os.path.isfile(path):
    names = sorted(f for f in os.listdir(CONFIG_DIR)
                   if f.endswith(".py") and f not in ("common.py", "__init__.py"))
    print(f"error: --config={path}: no such file; the configs in "
          f"{os.path.relpath(CONFIG_DIR)}/ are {', '.join(names)} "
          f"(e.g. --config={os.path.relpath(CONFIG_DIR)}/dense.py:tiny).", file=sys.stderr)
    sys.exit(2)
  return app.parse_flags_with_usage(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from mmjax.harness import sharding
  sharding.maybe_initialize_distributed()
  from mmjax.data.sources import DatasetCorruptedError, DatasetNotPreparedError
  from mmjax.harness import train
  from mmjax.harness.checkpointing import CheckpointMismatchError
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, KeyError, CheckpointMismatchError, DatasetNotPreparedError,
          DatasetCorruptedError, train.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
