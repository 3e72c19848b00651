"""Real handwritten digits for mm_arith/real: scikit-learn's bundled digits dataset.

1,797 8x8 scans (no download: the data ships inside scikit-learn), upscaled to 20x20 and
centred in 28x28 like MNIST. A fixed 80/20 split of the scans keeps test digits unseen.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

SIZE = 28


@functools.lru_cache(maxsize=1)
def _scans():
  from sklearn.datasets import load_digits  # reads a file inside the sklearn package
  d = load_digits()
  images = np.stack([_upscale(img) for img in d.images])
  order = np.random.default_rng(0).permutation(len(images))
  n_train = int(0.8 * len(images))
  return images, d.target.astype(np.int64), {"train": order[:n_train], "test": order[n_train:]}


def _upscale(img8: np.ndarray) -> np.ndarray:
  img = Image.fromarray((img8 / 16.0 * 255).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
  out = np.zeros((SIZE, SIZE), np.uint8)
  out[4:24, 4:24] = np.asarray(img)
  return out


def by_digit(split: str) -> dict[int, np.ndarray]:
  """digit -> indices of the scans of that digit in `split`."""
  _, labels, splits = _scans()
  idx = splits[split]
  return {d: idx[labels[idx] == d] for d in range(10)}


def scan(index: int) -> np.ndarray:
  """uint8 [28, 28, 1]."""
  return _scans()[0][index][..., None]
