"""`mm_arith`: the offline multimodal dataset, a TFDS builder (array_record, no TensorFlow).

Each example: an **image** of a handwritten digit a, an **audio** clip of a spoken digit b,
and a **text** question naming the operation; **label** = (a + b) mod 10 or (a − b) mod 10.
a, b and the operation are independent and uniform, so every single modality, and
image+text or audio+text, is at chance (10%); image+audio is capped at 60% (the two
candidate answers coincide only when 2b ≡ 0 mod 10); only all three reach 100%.

Configs:
  * `procedural`: NumPy only (glyphs.py, tones.py); writers and voices 0-79 train,
    80-99 test (held out).
  * `real`: scikit-learn's bundled handwritten digit scans (held-out scans for test) and
    espeak-ng speech (held-out voice variants for test).

Every example is generated from its own seed (config, split, index), so the data do not
depend on generation order. Sizes are builder arguments (`num_train`, `num_test`);
`prepare.py` refuses to silently reuse a directory prepared with other sizes.
"""
from __future__ import annotations

import contextlib
import logging
import sys

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from mmjax.data import glyphs, questions, tones

NUM_WRITERS, NUM_VOICES, NUM_TRAIN_STYLES = 100, 100, 80
DEFAULT_SIZES = {"train": 20_000, "test": 2_000}
_SPLIT_SEED = {"train": 0, "test": 1}
_CONFIG_SEED = {"procedural": 0, "real": 1}


def _no_dataset_info_warning(record):
  """TFDS warns 'Variant folder ... has no dataset_info.json' whenever it checks a dataset
  that is not prepared yet; mmjax's own message (prepare it with ...) says what to do."""
  return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def _quiet_tfds(progress_bars=True):
  logger = logging.getLogger("absl")  # TFDS logs through absl
  logger.addFilter(_no_dataset_info_warning)
  was = getattr(tqdm_utils, "_active", True)
  if not progress_bars:
    tfds.display_progress_bar(False)
  try:
    yield
  finally:
    logger.removeFilter(_no_dataset_info_warning)
    tfds.display_progress_bar(was)


class MmArith(tfds.core.GeneratorBasedBuilder):
  """Cross-modal digit arithmetic: image digit, spoken digit, question -> answer."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Adds the `index` feature."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="procedural", description="NumPy-drawn glyphs and tones."),
      tfds.core.BuilderConfig(name="real", description="scikit-learn digit scans and "
                              "espeak-ng speech."),
  ]

  def __init__(self, *, num_train: int | None = None, num_test: int | None = None, **kwargs):
    self._sizes = {"train": num_train or DEFAULT_SIZES["train"],
                   "test": num_test or DEFAULT_SIZES["test"]}
    for split, n in self._sizes.items():
      if int(n) != n or n <= 0:
        raise ValueError(f"num_{split}={n} is invalid: it must be a positive integer.")
    with _quiet_tfds():
      super().__init__(**kwargs)

  @property
  def sizes(self) -> dict:
    return dict(self._sizes)

  # TFDS's console messages are written for downloads ("Downloading and preparing dataset
  # Unknown size ..."); a local build says what it builds through mmjax's log instead
  # (sources.prepare), and shows progress bars only to a terminal, not to logs.
  def is_prepared(self) -> bool:
    with _quiet_tfds():
      return super().is_prepared()

  def download_and_prepare(self, *args, **kwargs):
    with _quiet_tfds(progress_bars=sys.stderr.isatty()):
      return super().download_and_prepare(*args, **kwargs)

  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    bytes_ = tfds.features.Encoding.BYTES
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8, encoding=bytes_),
            "audio": tfds.features.Tensor(shape=(tones.NUM_SAMPLES,), dtype=np.int16,
                                          encoding=bytes_),
            "question": tfds.features.Text(),
            "label": tfds.features.ClassLabel(num_classes=10),
            "digit_a": tfds.features.ClassLabel(num_classes=10),
            "digit_b": tfds.features.ClassLabel(num_classes=10),
            "op": tfds.features.ClassLabel(names=list(questions.OPS)),
            "writer_id": np.int32,
            "voice_id": np.int32,
            "template_id": np.int32,
            "index": np.int64,  # the generation seed's index; TFDS stores in hashed order
        }),
        supervised_keys=None,
        metadata=tfds.core.MetadataDict(sample_rate=tones.SAMPLE_RATE),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    if self.builder_config.name == "real":
      from mmjax.data import speech
      speech.espeak_binary()  # fail before writing anything if espeak-ng is missing
    return {split: self._generate_examples(split, n) for split, n in self._sizes.items()}

  def _generate_examples(self, split, num_examples):
    make = _real_example if self.builder_config.name == "real" else _procedural_example
    for i in range(num_examples):
      rng = np.random.default_rng([_CONFIG_SEED[self.builder_config.name],
                                   _SPLIT_SEED[split], i])
      yield i, {**make(split, rng), "index": i}


def _latents(rng):
  a, b = (int(x) for x in rng.integers(0, 10, size=2))
  op = questions.OPS[int(rng.integers(0, 2))]
  template = int(rng.integers(0, len(questions.TEMPLATES[op])))
  return a, b, op, template


def _record(a, b, op, template, image, audio, writer, voice):
  return {"image": image, "audio": audio, "question": questions.question(op, template),
          "label": questions.apply_op(a, b, op), "digit_a": a, "digit_b": b, "op": op,
          "writer_id": writer, "voice_id": voice, "template_id": template}


def _style(split, rng, total):
  lo, hi = (0, NUM_TRAIN_STYLES) if split == "train" else (NUM_TRAIN_STYLES, total)
  return int(rng.integers(lo, hi))


def _procedural_example(split, rng):
  a, b, op, template = _latents(rng)
  writer, voice = _style(split, rng, NUM_WRITERS), _style(split, rng, NUM_VOICES)
  return _record(a, b, op, template, glyphs.draw_digit(a, writer, rng),
                 tones.speak_digit(b, voice, rng), writer, voice)


def _real_example(split, rng):
  from mmjax.data import handwriting, speech
  a, b, op, template = _latents(rng)
  scans = handwriting.by_digit(split)[a]
  scan = int(scans[rng.integers(0, len(scans))])
  pool = speech.voices(split)
  voice = int(rng.integers(0, len(pool)))
  voice_id = voice + (0 if split == "train" else len(speech.voices("train")))  # global ids
  return _record(a, b, op, template, handwriting.scan(scan),
                 speech.speak_digit(b, pool[voice], rng), scan, voice_id)
