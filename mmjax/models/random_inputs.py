"""Random inputs of the right shapes for a model config (tests, quickstart, benchmarks)."""
from __future__ import annotations

import numpy as np


def random_inputs(cfg, batch_size: int, seed: int = 0, *, text_len=None, with_labels=True):
  """A dict keyed by modality (+ masks, + `label`) matching `cfg`, from NumPy's RNG.

  Text gets random byte tokens with a random amount of trailing padding (at least one real
  token); audio gets noise with random trailing padding (at least one patch of real audio).
  """
  rng = np.random.default_rng(seed)
  out = {}
  for m in cfg.modalities:
    t = cfg.towers[m]
    if t.kind == "text":
      n = text_len or t.max_len
      lengths = rng.integers(1, n + 1, size=batch_size)
      tok = rng.integers(3, min(t.vocab_size, 259), size=(batch_size, n)).astype(np.int32)
      mask = np.arange(n)[None, :] < lengths[:, None]
      out[m], out[f"{m}_mask"] = np.where(mask, tok, 0).astype(np.int32), mask
    elif t.kind == "image":
      out[m] = rng.uniform(0, 1, size=(batch_size,) + tuple(t.image_size) + (t.channels,)
                           ).astype(np.float32)
    elif t.kind == "audio":
      min_len = t.n_fft + t.hop_length * t.patch_time
      lengths = rng.integers(min(min_len, t.num_samples), t.num_samples + 1, size=batch_size)
      mask = np.arange(t.num_samples)[None, :] < lengths[:, None]
      wave = rng.normal(0, 0.3, size=(batch_size, t.num_samples)).astype(np.float32)
      out[m], out[f"{m}_mask"] = np.where(mask, wave, 0.0).astype(np.float32), mask
  if with_labels:
    if cfg.head.kind == "classify":
      out["label"] = rng.integers(0, cfg.head.num_classes, size=batch_size).astype(np.int32)
    else:
      shape = out[cfg.head.token_modality].shape[:2]
      out["label"] = rng.integers(0, cfg.head.num_classes, size=shape).astype(np.int32)
  return out
