"""Real TFDS datasets through the same pipeline, offline: tfds.testing.mock_data stands in
for the downloaded files (the pipeline, adapters and preprocessing are the real ones)."""
import importlib.util
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import sources
from mmjax.data.pipeline import InputConfig, eval_batches, train_iterator

HAS_TF = importlib.util.find_spec("tensorflow") is not None


def _cfg(dataset, modalities, tmp_path, **kw):
  return InputConfig(dataset=dataset, modalities=modalities, data_dir=str(tmp_path),
                     batch_size=8, num_threads=1, download=True, **kw)


def test_cifar10_images(tmp_path):
  with tfds.testing.mock_data(num_examples=20):
    b = next(train_iterator(_cfg("cifar10", ("image",), tmp_path)))
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert 0 <= b["image"].min() and b["image"].max() <= 1
  assert b["label"].shape == (8,) and b["label"].dtype == np.int32
  assert set(b) == {"image", "label", "example_mask"}


def test_imdb_reviews_text(tmp_path):
  with tfds.testing.mock_data(num_examples=20):
    cfg = _cfg("imdb_reviews", ("text",), tmp_path, text_len=64)
    b = next(train_iterator(cfg))
    evals = list(eval_batches(cfg, "test"))
  assert b["text"].shape == (8, 64) and b["text"].dtype == np.int32
  assert b["text_mask"].dtype == bool and np.array_equal(b["text_mask"], b["text"] != 0)
  assert sum(int(e["example_mask"].sum()) for e in evals) == 20


@pytest.mark.skipif(not HAS_TF, reason="speech_commands' TFDS builder needs the `tf` extra")
def test_speech_commands_audio(tmp_path):
  with tfds.testing.mock_data(num_examples=16):
    b = next(train_iterator(_cfg("speech_commands", ("audio",), tmp_path,
                                 audio_samples=16000)))
  assert b["audio"].shape == (8, 16000) and b["audio_mask"].shape == (8, 16000)


@pytest.mark.skipif(not HAS_TF, reason="coco_captions' TFDS builder needs the `tf` extra")
def test_coco_captions_image_text(tmp_path):
  with tfds.testing.mock_data(num_examples=16):
    b = next(train_iterator(_cfg("coco_captions", ("image", "text"), tmp_path)))
  assert "label" not in b and b["text"].shape == (8, 48)
  assert b["image"].shape == (8, 224, 224, 3)


def test_offline_without_download_fails_at_once(tmp_path):
  t0 = time.perf_counter()
  with pytest.raises(sources.DatasetNotPreparedError) as err:
    next(train_iterator(InputConfig(dataset="cifar10", modalities=("image",),
                                    data_dir=str(tmp_path), batch_size=8)))
  msg = str(err.value)
  assert "cifar10 is not prepared" in msg and "--download" in msg and str(tmp_path) in msg
  assert time.perf_counter() - t0 < 10
  with pytest.raises(sources.DatasetNotPreparedError, match="downloading is off"):
    sources.prepare("cifar10", str(tmp_path), log=lambda *_: None)
