"""Images as each pretrained family was trained to see them: resized, cropped and
normalized like its reference image processor (Hugging Face's `ViTImageProcessor`,
`CLIPImageProcessor`, `SiglipImageProcessor`), so that a checkpoint's accuracy is its
model card's and not an artifact of a different resize.

The family's defaults apply unless the checkpoint's directory holds a
`preprocessor_config.json` (Hugging Face's), whose settings then win. Resizing uses PIL,
as the references do (same filter, same rounding of the target size); grayscale images
are repeated to three channels (the references' `do_convert_rgb`).

    spec = image_processing.spec("clip", image_size=224, checkpoint="/ckpt/clip-b32")
    x = image_processing.apply(uint8_image, spec)      # float32 [224, 224, 3]
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
RESAMPLE = {2: "bilinear", 3: "bicubic", 0: "nearest", 1: "lanczos"}  # PIL's codes


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """resize "square" (to size x size) or "shortest_edge" (the short side to size, the
  aspect kept), then a center crop to crop x crop (None: none); values scaled by
  `rescale`, then (x - mean) / std per channel."""
  size: int
  resize: str = "square"
  resample: str = "bilinear"
  crop: int | None = None
  rescale: float = 1 / 255
  mean: tuple = HALF
  std: tuple = HALF

  @property
  def out_size(self) -> int:
    return self.crop or self.size


DEFAULTS = {  # each family's reference processor at its defaults
    "vit": dict(resize="square", resample="bilinear", mean=HALF, std=HALF),
    "clip": dict(resize="shortest_edge", resample="bicubic", crop=True, mean=OPENAI_MEAN,
                 std=OPENAI_STD),
    "siglip": dict(resize="square", resample="bicubic", mean=HALF, std=HALF),
}


def _from_hf(path: str) -> dict:
  """The settings of a Hugging Face preprocessor_config.json."""
  try:
    with open(path) as f:
      c = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read as JSON ({e}); restore the file from the "
                     "checkpoint, or delete it to use the family's defaults.") from None
  out = {}
  size = c.get("size")
  if isinstance(size, int):
    size = {"shortest_edge": size}
  if c.get("do_resize", True) and isinstance(size, dict):
    if "shortest_edge" in size:
      out.update(resize="shortest_edge", size=int(size["shortest_edge"]))
    elif "height" in size:
      out.update(resize="square", size=int(size["height"]))
  if "resample" in c:
    out["resample"] = RESAMPLE.get(int(c["resample"]), "bicubic")
  crop = c.get("crop_size")
  if c.get("do_center_crop") and crop:
    out["crop"] = int(crop["height"] if isinstance(crop, dict) else crop)
  elif "do_center_crop" in c:
    out["crop"] = None
  if not c.get("do_rescale", True):
    out["rescale"] = 1.0
  elif "rescale_factor" in c:
    out["rescale"] = float(c["rescale_factor"])
  if c.get("do_normalize", True):
    for k in ("mean", "std"):
      if f"image_{k}" in c:
        out[k] = tuple(float(v) for v in c[f"image_{k}"])
  else:
    out.update(mean=(0.0,) * 3, std=(1.0,) * 3)
  return out


def spec(family: str, image_size: int, checkpoint: str | None = None) -> ImageSpec:
  """The family's processor at the model's resolution, overridden by the checkpoint's
  preprocessor_config.json (in `checkpoint` if a directory, else beside it)."""
  d = dict(DEFAULTS[family])
  d["crop"] = image_size if d.get("crop") else None
  if checkpoint:
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.exists(path):
      d.update(_from_hf(path))
  s = ImageSpec(size=int(d.pop("size", image_size)), **d)
  if s.out_size != image_size:
    raise ValueError(f"the image processor ({checkpoint}/preprocessor_config.json) makes "
                     f"{s.out_size}x{s.out_size} images but the model takes {image_size}; "
                     "set config.model.image_size to match the checkpoint.")
  return s


def _resize(img: np.ndarray, spec_: ImageSpec) -> np.ndarray:
  from PIL import Image
  h, w = img.shape[:2]
  if spec_.resize == "square":
    size = (spec_.size, spec_.size)
  else:  # the short side to `size`, the long one scaled and truncated (as the reference)
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(spec_.size * long / short)
    size = (new_long, spec_.size) if w <= h else (spec_.size, new_long)
  if size == (h, w):
    return img
  resample = getattr(Image.Resampling, spec_.resample.upper())
  return np.asarray(Image.fromarray(img).resize((size[1], size[0]), resample=resample))


def _center_crop(img: np.ndarray, crop: int) -> np.ndarray:
  h, w = img.shape[:2]
  if h < crop or w < crop:  # the reference pads with zeros, centered
    out = np.zeros((max(h, crop), max(w, crop), img.shape[2]), img.dtype)
    t, l = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    out[t:t + h, l:l + w] = img
    img, h, w = out, *out.shape[:2]
  top, left = (h - crop) // 2, (w - crop) // 2
  return img[top:top + crop, left:left + crop]


def apply(image, spec_: ImageSpec) -> np.ndarray:
  """One image (uint8 [h, w, c], c in 1, 3, 4) -> float32 [s, s, 3], as the reference."""
  img = np.asarray(image)
  if img.ndim == 2:
    img = img[..., None]
  if img.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [h, w, c], got {img.dtype} {img.shape}.")
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  elif img.shape[-1] == 4:
    img = img[..., :3]
  img = _resize(img, spec_)
  if spec_.crop:
    img = _center_crop(img, spec_.crop)
  x = (img.astype(np.float64) * spec_.rescale).astype(np.float32)
  return ((x - np.asarray(spec_.mean, np.float32)) / np.asarray(spec_.std, np.float32)
          ).astype(np.float32)
