"""A Hugging Face checkpoint directory's `config.json` -> the family's `config.model`
sizes, so that any size of a family (the tiny test models, So400m, Whisper large) loads
by path without naming a variant; a `config.json` of another model type is an error that
names the family it is.

    args = hf_config.model_args("clip", "/ckpt/clip-vit-base-patch32")
    # {"variant": None, "image": {...}, "text": {...}, "patch": 32, "dim": 512, ...}
"""
from __future__ import annotations

import json
import os

MODEL_TYPES = {"vit": "vit", "clip": "clip", "siglip": "siglip", "whisper": "whisper",
               "bert": "bert"}


def folder(checkpoint: str) -> str:
  return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or "."


def weights_file(checkpoint: str) -> str:
  """The weights in a checkpoint directory (model.safetensors, else the only .safetensors
  or .npz), or the file itself."""
  if not os.path.isdir(checkpoint):
    return checkpoint
  files = sorted(f for f in os.listdir(checkpoint) if f.endswith((".safetensors", ".npz")))
  if "model.safetensors" in files:
    return os.path.join(checkpoint, "model.safetensors")
  if len(files) == 1:
    return os.path.join(checkpoint, files[0])
  raise ValueError(f"checkpoint={checkpoint}: {'no' if not files else 'several'} weight files "
                   f"(.safetensors, .npz) there{': ' + ', '.join(files) if files else ''}; "
                   "give the file itself.")


def read(checkpoint: str):
  """The config.json in (or beside) the checkpoint, or None when there is none."""
  path = os.path.join(folder(checkpoint), "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read as JSON ({e}); restore it from the checkpoint.")


def _tower(c):
  return dict(width=c["hidden_size"], depth=c["num_hidden_layers"],
              heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"])


def _vit(c):
  return dict(_tower(c), patch=c["patch_size"], image_size=c["image_size"],
              channels=c.get("num_channels", 3), eps=c.get("layer_norm_eps", 1e-12),
              num_classes=_classes(c, "ForImageClassification"),
              activation=c.get("hidden_act", "gelu"))


def _clip(c):
  t, v = c["text_config"], c["vision_config"]
  return dict(image=_tower(v), text=_tower(t), patch=v["patch_size"],
              dim=c["projection_dim"], image_size=v["image_size"], vocab_size=t["vocab_size"],
              max_len=t["max_position_embeddings"], eos_token_id=t.get("eos_token_id"),
              eps=t.get("layer_norm_eps", 1e-5), activation=t.get("hidden_act", "quick_gelu"))


def _siglip(c):
  t, v = c["text_config"], c["vision_config"]
  return dict(image=_tower(v), text=_tower(t), patch=v["patch_size"],
              image_size=v["image_size"], vocab_size=t["vocab_size"],
              max_len=t["max_position_embeddings"], eps=t.get("layer_norm_eps", 1e-6))


def _whisper(c):
  return dict(width=c["d_model"], depth=c["encoder_layers"],
              heads=c["encoder_attention_heads"], mlp_dim=c["encoder_ffn_dim"],
              n_mels=c["num_mel_bins"], max_positions=c["max_source_positions"])


def _bert(c):
  return dict(_tower(c), vocab_size=c["vocab_size"], max_len=c["max_position_embeddings"],
              type_vocab_size=c.get("type_vocab_size", 2), eps=c.get("layer_norm_eps", 1e-12),
              num_classes=_classes(c, "ForSequenceClassification"))


def _classes(c, head: str) -> int:
  """The classifier's size when the checkpoint is a classifier (`architectures`, written
  by save_pretrained; without it, the label map's size), else 0."""
  arch = c.get("architectures")
  return len(c.get("id2label") or {}) if not arch or arch[0].endswith(head) else 0


ARGS_OF = {"vit": _vit, "clip": _clip, "siglip": _siglip, "whisper": _whisper, "bert": _bert}


def model_args(family: str, checkpoint: str) -> dict:
  """config.model sizes for `family` from the checkpoint's config.json ({} without one)."""
  c = read(checkpoint)
  if c is None:
    return {}
  kind = c.get("model_type")
  if kind != MODEL_TYPES[family]:
    other = next((f for f, t in MODEL_TYPES.items() if t == kind), None)
    raise ValueError(f"checkpoint {checkpoint} is a {kind!r} model (its config.json), not "
                     f"{family}; use model={other}." if other else
                     f"checkpoint {checkpoint} is a {kind!r} model (its config.json), which "
                     f"mmjax.pretrained.{family} cannot load; give a {family} checkpoint.")
  try:
    return {"variant": None, **ARGS_OF[family](c)}
  except KeyError as e:
    raise ValueError(f"{folder(checkpoint)}/config.json lacks {e} for a {family} model; "
                     "restore it from the checkpoint.") from None
