"""The input pipeline: TFDS data source + grain, in process, no TensorFlow.

  cfg = InputConfig(dataset="mm_arith/procedural", data_dir=..., batch_size=64, seed=0)
  it = train_iterator(cfg)          # endless, reshuffled every epoch
  batch = next(it)                  # {"image", "audio", "audio_mask", "text", "text_mask",
                                    #  "label", "example_mask", latents...} numpy arrays
  state = it.get_state()            # JSON-able; it.set_state(state) resumes exactly
  for batch in eval_batches(cfg):   # every test example exactly once; padding masked

Determinism: the order depends only on (seed, epoch). Multi-host: every host computes the
same global order and keeps every process_count-th example starting at its process_index,
so a global batch of B is B / process_count examples per host, and the hosts together see
exactly the examples a single host would.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import grain
import jax
import numpy as np

from mmjax.data import adapters, sources


@dataclasses.dataclass(frozen=True)
class InputConfig:
  dataset: str = "mm_arith/procedural"
  data_dir: Optional[str] = None
  batch_size: int = 64  # global, over all hosts
  seed: int = 0
  modalities: tuple = ("audio", "image", "text")
  text_len: int = 48
  audio_samples: int = 8000
  image_size: Optional[tuple] = None  # resize images to (h, w); None: as stored
  train_split: str = "train"
  eval_split: str = "test"
  num_threads: int = 2  # grain read threads per host
  prefetch: int = 4  # batches read ahead per host
  download: bool = False  # TFDS catalog datasets only; mmjax never downloads by default
  features: Optional[tuple] = None  # ((modality or "label", feature path), ...): overrides
  # the adapter (config.data.features)
  preprocess: Optional[dict] = dataclasses.field(default=None, compare=False, hash=False)
  # {modality: fn(raw) -> {key: array}}: the model family's own (Family.preprocess)


def host_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch <= 0:
    raise ValueError(f"batch_size={global_batch} is invalid: it must be positive.")
  if global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} does not divide across {process_count} "
                     f"processes; use a multiple of {process_count}.")
  return global_batch // process_count


def _hosts(process_index, process_count):
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} is outside 0..{pc - 1}.")
  return pi, pc


def feature_pairs(features):
  """config.data.features ({modality or "label": feature}) as InputConfig.features."""
  if not features:
    return None
  d = features.to_dict() if hasattr(features, "to_dict") else features
  if not isinstance(d, dict) or not all(isinstance(v, str) for v in d.values()):
    raise ValueError(f"config.data.features={d!r} must map modalities (and 'label') to "
                     "feature names, e.g. {'image': 'img', 'label': 'fine_label'}.")
  return tuple(sorted(d.items()))


def adapter_of(cfg: InputConfig) -> adapters.Adapter:
  """The dataset's adapter: config.data.features, mmjax's table, or read off its TFDS
  features (the builder's info needs no prepared data)."""
  name = sources.split_name(cfg.dataset)[0]
  info = None
  if not cfg.features and name not in adapters.ADAPTERS:
    info = sources.get_builder(cfg.dataset, cfg.data_dir or sources.default_data_dir()
                               ).info.features
  return adapters.get_adapter(cfg.dataset, cfg.features, info)


def _prep_fn(cfg: InputConfig):
  adapter = adapter_of(cfg)
  modalities = tuple(sorted(cfg.modalities))
  if not modalities:
    raise ValueError("InputConfig.modalities is empty; name at least one modality.")
  for m in modalities:
    if m not in adapter.modalities:
      several = dict(adapter.ambiguous).get(m.rstrip("0123456789"))
      if several:
        raise ValueError(f"{cfg.dataset} has several {m} features {list(several)}; pick one "
                         f"with config.data.features={{'{m}': '{several[0]}', 'label': ...}}.")
      raise ValueError(f"the model needs modality {m!r}, which {cfg.dataset} does not "
                       f"provide (it provides {sorted(adapter.modalities) or 'none'}); choose a "
                       f"dataset with {m}, or map a feature to it with config.data.features.")
  if cfg.text_len <= 0 or cfg.audio_samples <= 0:
    raise ValueError(f"text_len={cfg.text_len} and audio_samples={cfg.audio_samples} must "
                     "be positive.")

  def prep(example):
    return adapters.preprocess(example, adapter, modalities, text_len=cfg.text_len,
                               audio_samples=cfg.audio_samples, image_size=cfg.image_size,
                               family=cfg.preprocess)
  return prep


def _with_mask(example, valid: bool):
  example["example_mask"] = np.bool_(valid)
  return example


def train_dataset(cfg: InputConfig, *, process_index=None, process_count=None):
  """An endless grain IterDataset of this host's share of shuffled global batches."""
  pi, pc = _hosts(process_index, process_count)
  per_host = host_batch_size(cfg.batch_size, pc)
  prep = _prep_fn(cfg)
  source = sources.open_split(cfg.dataset, cfg.train_split, cfg.data_dir,
                              download=cfg.download)
  ds = (grain.MapDataset.source(source)
        .shuffle(seed=cfg.seed)
        .repeat(None)  # reseeded every epoch: a fresh permutation per epoch
        .slice(slice(pi, None, pc))
        .map(lambda ex: _with_mask(prep(ex), True))
        .batch(per_host, drop_remainder=True))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                              prefetch_buffer_size=cfg.prefetch))


def train_iterator(cfg: InputConfig, **hosts):
  """Iterator with get_state()/set_state() for exact resumption."""
  return iter(train_dataset(cfg, **hosts))


def num_eval_batches(num_examples: int, global_batch: int) -> int:
  return math.ceil(num_examples / global_batch)


def eval_batches(cfg: InputConfig, split: Optional[str] = None, *, process_index=None,
                 process_count=None):
  """This host's share of every example of `split`, once, in fixed order.

  The last global batch is padded with copies of example 0 whose `example_mask` is False;
  every host yields the same number of batches (as multi-host steps require).
  """
  pi, pc = _hosts(process_index, process_count)
  per_host = host_batch_size(cfg.batch_size, pc)
  prep = _prep_fn(cfg)
  source = sources.open_split(cfg.dataset, split or cfg.eval_split, cfg.data_dir,
                              download=cfg.download)
  n = len(source)
  total = num_eval_batches(n, cfg.batch_size) * cfg.batch_size

  def load(i):
    i = int(i)
    return _with_mask(prep(source[i if i < n else 0]), i < n)

  ds = (grain.MapDataset.range(total)
        .slice(slice(pi, None, pc))
        .map(load)
        .batch(per_host, drop_remainder=True))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                   prefetch_buffer_size=cfg.prefetch)))
