"""Run one experiment: a config file plus flags.

  python -m experiments.main --config=experiments/configs/dense.py[:tiny] --workdir=DIR \
      [--config.optimizer.lr=3e-4 ...]

Any config field can be overridden with --config.<path>=<value> (type-checked by
ml_collections). Config errors are reported before anything is compiled or written; a
workdir that already holds a checkpoint is resumed.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:args]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and config.json go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from mmjax import sharding
  sharding.maybe_initialize_distributed()
  from mmjax import train
  from mmjax.checkpointing import CheckpointMismatchError
  from mmjax.data.sources import DatasetCorruptedError, DatasetNotPreparedError
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, KeyError, CheckpointMismatchError, DatasetNotPreparedError,
          DatasetCorruptedError, train.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
