"""Opening prepared TFDS datasets as random-access sources, and preparing them.

Offline by design: nothing is downloaded unless `download=True` is passed explicitly.
A dataset that is not prepared fails at once with the command that prepares it (where
`tfds.load` would retry the network for minutes).
"""
from __future__ import annotations

import os
import shutil

import tensorflow_datasets as tfds

from mmjax.data import mm_arith  # noqa: F401  (registers the builder with TFDS)

OFFLINE_BUILDERS = {"mm_arith": ("procedural", "real")}


class DatasetNotPreparedError(FileNotFoundError):
  """The data_dir has no prepared copy of the dataset."""


class DatasetCorruptedError(OSError):
  """A prepared dataset's files cannot be read."""


def default_data_dir() -> str:
  return os.environ.get("MMJAX_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def split_name(dataset: str):
  """'mm_arith/procedural' -> ('mm_arith', 'procedural'); 'cifar10' -> ('cifar10', None)."""
  if not isinstance(dataset, str) or not dataset or dataset.count("/") > 1:
    raise ValueError(f"dataset={dataset!r} is not a dataset name: use 'name' or "
                     "'name/config', e.g. 'mm_arith/procedural' or 'cifar10'.")
  name, _, config = dataset.partition("/")
  return name, config or None


def prepare_command(dataset, data_dir):
  extra = "" if split_name(dataset)[0] in OFFLINE_BUILDERS else " --download"
  return f"python -m mmjax.data.prepare --dataset={dataset} --data_dir={data_dir}{extra}"


def get_builder(dataset: str, data_dir: str, **builder_kwargs):
  """A TFDS builder for `dataset`, with a clear error for unknown names or configs."""
  name, config = split_name(dataset)
  if name in OFFLINE_BUILDERS:
    configs = OFFLINE_BUILDERS[name]
    if config is None:
      config = configs[0]
    if config not in configs:
      raise ValueError(f"unknown config {config!r} of dataset {name!r}; valid configs: "
                       f"{', '.join(f'{name}/{c}' for c in configs)}.")
    return mm_arith.MmArith(config=config, data_dir=data_dir, file_format="array_record",
                            **builder_kwargs)
  try:
    return tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    import importlib.util
    tf_hint = ("" if importlib.util.find_spec("tensorflow") else
               " Some TFDS builders (glue, speech_commands, coco_captions) exist only with "
               "TensorFlow installed: pip install tensorflow, for preparing them.")
    raise ValueError(f"unknown dataset {dataset!r}: it is neither an mmjax offline dataset "
                     f"({', '.join(f'{n}/{c}' for n, cs in OFFLINE_BUILDERS.items() for c in cs)}"
                     f") nor in the TFDS catalog.{tf_hint}") from e


def open_split(dataset: str, split: str, data_dir: str | None = None, *, download=False):
  """A random-access source (len, [i]) over one split of a prepared dataset."""
  data_dir = data_dir or default_data_dir()
  builder = get_builder(dataset, data_dir)
  if download:
    builder.download_and_prepare(file_format="array_record")
  elif not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"{dataset} is not prepared in data_dir={data_dir}. Prepare it with:\n  "
        f"{prepare_command(dataset, data_dir)}\n(mmjax never downloads implicitly.)")
  splits = list(builder.info.splits.keys())
  if splits and split not in splits:  # (empty only under tfds.testing.mock_data)
    raise ValueError(f"{dataset} has no split {split!r}; it has {splits}.")
  try:
    source = builder.as_data_source(split=split)
    len(source)
    source[0]  # the first read validates the record files' structure
  except Exception as e:  # array_record raises plain RuntimeErrors on damaged files
    if isinstance(e, (ValueError, DatasetNotPreparedError)):
      raise
    raise DatasetCorruptedError(
        f"{dataset} in {builder.data_dir} cannot be read ({type(e).__name__}: "
        f"{str(e)[:200]}). The files are truncated or corrupted: delete that directory and "
        f"prepare again:\n  {prepare_command(dataset, data_dir)}") from e
  return source


def prepare(dataset: str, data_dir: str | None = None, *, num_train=None, num_test=None,
            overwrite=False, download=False, log=print):
  """Prepare `dataset` in `data_dir`; idempotent. Returns the builder."""
  data_dir = data_dir or default_data_dir()
  name, _ = split_name(dataset)
  for flag, n in (("num_train", num_train), ("num_test", num_test)):
    if n is not None and (int(n) != n or n <= 0):
      raise ValueError(f"--{flag}={n} is invalid: it must be a positive integer.")
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--data_dir={data_dir} cannot be created ({e.strerror}); choose a "
                     "writable directory.") from e
  if not os.access(data_dir, os.W_OK):
    raise ValueError(f"--data_dir={data_dir} is not writable; choose a writable directory.")
  offline = name in OFFLINE_BUILDERS
  if not offline and (num_train or num_test):
    raise ValueError("--num_train/--num_test apply only to mmjax's offline datasets "
                     f"({', '.join(OFFLINE_BUILDERS)}); {dataset} has fixed splits.")
  kwargs = dict(num_train=num_train, num_test=num_test) if offline else {}
  builder = get_builder(dataset, data_dir, **kwargs)
  if builder.is_prepared():
    have = {s: builder.info.splits[s].num_examples for s in ("train", "test")
            if s in builder.info.splits}
    want = {s: n for s, n in (("train", num_train), ("test", num_test)) if n}
    if all(have.get(s) == n for s, n in want.items()):
      log(f"{dataset} is already prepared in {builder.data_dir} ({have}).")
      return builder
    if not overwrite:
      raise ValueError(
          f"{dataset} in {builder.data_dir} was prepared with {have} examples, but "
          f"{want} were asked for. Use another --data_dir, or pass --overwrite to delete "
          "and regenerate it.")
    log(f"deleting {builder.data_dir} (--overwrite)")
    shutil.rmtree(builder.data_dir)
    builder = get_builder(dataset, data_dir, **kwargs)
  if not offline and not download:
    raise DatasetNotPreparedError(
        f"{dataset} is not prepared in {data_dir} and downloading is off. Pass --download "
        "(needs internet), or copy a prepared copy into that data_dir.")
  if offline:
    log(f"[data] preparing {dataset} ({builder.sizes['train']} train + "
        f"{builder.sizes['test']} test examples) in {data_dir}")
  else:
    log(f"[data] downloading and preparing {dataset} in {data_dir}")
  builder.download_and_prepare(file_format="array_record")
  log(f"[data] prepared {dataset}: " + ", ".join(
      f"{s} {builder.info.splits[s].num_examples}" for s in builder.info.splits))
  return builder


def ensure_prepared(dataset: str, data_dir: str, num_train=None, num_test=None, log=print,
                    download=False):
  """Prepare an offline dataset that is missing from the data_dir; a catalog dataset that
  is missing is an error now, before a run writes anything (unless `download`: reading it
  downloads and prepares it)."""
  if get_builder(dataset, data_dir).is_prepared():
    return
  if split_name(dataset)[0] not in OFFLINE_BUILDERS:
    if download:
      return
    raise DatasetNotPreparedError(
        f"{dataset} is not prepared in data_dir={data_dir}. Prepare it with:\n  "
        f"{prepare_command(dataset, data_dir)}\n(mmjax never downloads implicitly.)")
  prepare(dataset, data_dir, num_train=num_train, num_test=num_test, log=log)


def label_names(dataset: str, data_dir: str | None = None, label: str = "label"):
  """The class names of the dataset's `label` feature (a ClassLabel), from its TFDS info
  (no data read: the catalog's builders carry them), or None when it has no such label."""
  import tensorflow_datasets as tfds
  feats = get_builder(dataset, data_dir or default_data_dir()).info.features
  feat = feats[label] if label in feats else None
  return tuple(feat.names) if isinstance(feat, tfds.features.ClassLabel) else None
