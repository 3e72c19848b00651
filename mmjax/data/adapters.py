"""Which TFDS feature feeds which modality, and how each modality is preprocessed.

An adapter maps a dataset's features to modalities and a label; preprocessing depends only
on the modality kind, so mm_arith and real TFDS datasets share one code path:
  * image: uint8 [h, w, c] -> float32 in [0, 1], resized (bilinear) to `image_size` when
    one is given (datasets whose images vary in size, e.g. coco_captions);
  * text: a string -> byte tokens int32 [text_len] + mask (mmjax.data.tokenizer);
  * audio: integer PCM [n] -> float32 in [-1, 1], cropped or zero-padded to
    `audio_samples`, + mask (the model computes the log-mel spectrogram itself).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data import tokenizer


@dataclasses.dataclass(frozen=True)
class Adapter:
  modalities: dict  # modality -> feature path ("captions/text" reaches into a dict)
  label: str | None = "label"
  extras: tuple = ()  # latent fields passed through for analysis
  image_size: tuple | None = None  # resize to (h, w) when the images vary in size
  ambiguous: tuple = ()  # (modality, (feature, ...)): several features of that kind


ADAPTERS = {
    "mm_arith": Adapter({"image": "image", "audio": "audio", "text": "question"},
                        extras=("digit_a", "digit_b", "op", "writer_id", "voice_id", "index")),
    "cifar10": Adapter({"image": "image"}),
    "mnist": Adapter({"image": "image"}),
    "imdb_reviews": Adapter({"text": "text"}),
    "speech_commands": Adapter({"audio": "audio"}),
    "coco_captions": Adapter({"image": "image", "text": "captions/text"}, label=None,
                             image_size=(224, 224)),
}


def get_adapter(dataset: str, features=None, info_features=None) -> Adapter:
  """The adapter for `dataset`: `features` ({modality or "label": feature path}, from
  config.data.features) when given; else mmjax's table; else one read off the dataset's
  TFDS features (`info_features`), so that any TFDS dataset works by name."""
  name = dataset.partition("/")[0]
  if features:
    feats = dict(features)
    return Adapter({k: v for k, v in feats.items() if k != "label"}, label=feats.get("label"))
  if name in ADAPTERS:
    return ADAPTERS[name]
  if info_features is None:
    raise ValueError(f"no modality adapter for dataset {name!r}; known: {sorted(ADAPTERS)}. "
                     "Name its features with config.data.features (e.g. {'image': 'img', "
                     "'label': 'label'}), or add one to mmjax/data/adapters.py:ADAPTERS.")
  return infer(dataset, info_features)


def infer(dataset: str, info_features) -> Adapter:
  """Modalities from a TFDS FeaturesDict's top level: Image -> image, Audio -> audio,
  Text -> text, the ClassLabel -> label. A kind with several features (glue/mrpc's two
  sentences) is left out, and asking for it names them (`ambiguous`)."""
  import tensorflow_datasets as tfds
  f = tfds.features
  kinds, labels = {"image": [], "audio": [], "text": []}, []
  for key, feat in info_features.items():
    if isinstance(feat, f.Image):
      kinds["image"].append(key)
    elif isinstance(feat, f.Audio):
      kinds["audio"].append(key)
    elif isinstance(feat, f.Text):
      kinds["text"].append(key)
    elif isinstance(feat, f.ClassLabel):
      labels.append(key)
  label = "label" if "label" in labels else (labels[0] if len(labels) == 1 else None)
  return Adapter({m: keys[0] for m, keys in kinds.items() if len(keys) == 1}, label=label,
                 ambiguous=tuple((m, tuple(keys)) for m, keys in kinds.items() if len(keys) > 1))


def _feature(example, path):
  x = example
  for part in path.split("/"):
    x = x[part]
  return x


def _resize(img, size):
  img = np.asarray(img)
  if size is None or tuple(img.shape[:2]) == tuple(size):
    return img
  from PIL import Image
  chans = [np.asarray(Image.fromarray(img[..., c]).resize((size[1], size[0]), Image.BILINEAR))
           for c in range(img.shape[-1])]
  return np.stack(chans, axis=-1)


def preprocess(example: dict, adapter: Adapter, modalities, *, text_len: int,
               audio_samples: int, image_size=None, family=None) -> dict:
  """One TFDS example -> model inputs for `modalities` (+ label, extras). `family`:
  {modality: fn(raw) -> {key: array}}, a model family's own preprocessing (its resize
  and normalization, its tokenizer), which replaces the generic one for that modality."""
  out = {}
  for m in modalities:
    x = _feature(example, adapter.modalities[m])  # pipeline._prep_fn checked `m` exists
    if m.startswith("text"):
      if isinstance(x, (list, tuple, np.ndarray)) and not isinstance(x, (str, bytes)):
        x = x[0]  # several captions: the first
      x = x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
    if family and m in family:
      out.update(family[m](x))
    elif m.startswith("image"):
      out[m] = _resize(x, image_size or adapter.image_size).astype(np.float32) / 255.0
    elif m.startswith("text"):
      out[m], out[f"{m}_mask"] = tokenizer.encode(x, text_len)
    else:  # audio
      x = np.asarray(x)
      scale = float(np.iinfo(x.dtype).max + 1) if np.issubdtype(x.dtype, np.integer) else 1.0
      wave = np.zeros(audio_samples, np.float32)
      n = min(len(x), audio_samples)
      wave[:n] = x[:n].astype(np.float32) / scale
      out[m] = wave
      out[f"{m}_mask"] = np.arange(audio_samples) < n
  if adapter.label is not None:
    out["label"] = np.int32(_feature(example, adapter.label))
  for e in adapter.extras:
    out[e] = np.int32(example[e])
  return out
