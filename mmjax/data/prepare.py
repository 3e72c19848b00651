"""Prepare a dataset for offline use (idempotent).

  python -m mmjax.data.prepare --dataset=mm_arith/procedural --data_dir=DIR \
      [--num_train=N --num_test=M] [--overwrite]
  python -m mmjax.data.prepare --dataset=cifar10 --data_dir=DIR --download   # needs internet

TFDS writes into a temporary `incomplete.*` directory and renames it only when every
split is written, so an interrupted run never leaves a directory that looks complete.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags, logging

_DATASET = flags.DEFINE_string("dataset", "mm_arith/procedural",
                               "name[/config]: mm_arith/procedural, mm_arith/real, or a TFDS "
                               "catalog name (with --download)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where prepared datasets live (default: "
                                "$MMJAX_DATA_DIR or ~/tensorflow_datasets)")
_NUM_TRAIN = flags.DEFINE_integer("num_train", None, "train examples (mm_arith only)")
_NUM_TEST = flags.DEFINE_integer("num_test", None, "test examples (mm_arith only)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "regenerate a dataset prepared with "
                               "other sizes")
_DOWNLOAD = flags.DEFINE_bool("download", False, "allow downloading (TFDS catalog datasets)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from mmjax.data import sources
  t0 = time.perf_counter()
  try:
    sources.prepare(_DATASET.value, _DATA_DIR.value, num_train=_NUM_TRAIN.value,
                    num_test=_NUM_TEST.value, overwrite=_OVERWRITE.value,
                    download=_DOWNLOAD.value)
  except (ValueError, RuntimeError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  app.run(main)
