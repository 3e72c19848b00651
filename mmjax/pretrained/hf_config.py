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


# What transformers' config classes default to (v4.57): a checkpoint's config.json
# leaves out what equals them (google/siglip-base-patch16-224's names no size at all).
# tests/golden/make_golden.py writes transformers' own values to
# tests/golden/hf_config_defaults.json, and a test compares them with these.
DEFAULTS = {
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, patch_size=16, image_size=224, num_channels=3,
                layer_norm_eps=1e-12, hidden_act="gelu"),
    "clip_text": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                      intermediate_size=2048, layer_norm_eps=1e-5, hidden_act="quick_gelu",
                      vocab_size=49408, max_position_embeddings=77, eos_token_id=49407),
    "clip_vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, patch_size=32, image_size=224, num_channels=3,
                        layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "clip": dict(projection_dim=512),
    "siglip_text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, layer_norm_eps=1e-6,
                        hidden_act="gelu_pytorch_tanh", vocab_size=32000,
                        max_position_embeddings=64),
    "siglip_vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, patch_size=16, image_size=224,
                          num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    "whisper": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                    encoder_ffn_dim=1536, num_mel_bins=80, max_source_positions=1500),
    "bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, layer_norm_eps=1e-12, hidden_act="gelu",
                 vocab_size=30522, max_position_embeddings=512, type_vocab_size=2),
}
# transformers' activation names -> mmjax.pretrained.encoder's
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _with_defaults(c: dict, kind: str) -> dict:
  return {**DEFAULTS[kind], **{k: v for k, v in (c or {}).items() if v is not None}}


def _activation(name: str) -> str:
  if name not in ACTIVATIONS:
    raise ValueError(f"config.json: hidden_act={name!r} is not one mmjax builds; it builds "
                     f"{sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def _tower(c):
  return dict(width=c["hidden_size"], depth=c["num_hidden_layers"],
              heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"])


def _vit(c):
  c = _with_defaults(c, "vit")
  return dict(_tower(c), patch=c["patch_size"], image_size=c["image_size"],
              channels=c["num_channels"], eps=c["layer_norm_eps"],
              num_classes=_classes(c, "ForImageClassification"),
              activation=_activation(c["hidden_act"]))


def _clip(c):
  t, v = _with_defaults(c.get("text_config"), "clip_text"), _with_defaults(
      c.get("vision_config"), "clip_vision")
  eos = t.get("eos_token_id")
  return dict(image=_tower(v), text=_tower(t), patch=v["patch_size"],
              dim=c.get("projection_dim") or DEFAULTS["clip"]["projection_dim"],
              image_size=v["image_size"], vocab_size=t["vocab_size"],
              max_len=t["max_position_embeddings"],
              # eos 2: the legacy configs (OpenAI's), whose end token is the highest id:
              # transformers pools at the largest id then, and so does mmjax (None)
              eos_token_id=None if eos == 2 else eos, eps=t["layer_norm_eps"],
              activation=_activation(t["hidden_act"]))


def _siglip(c):
  t, v = _with_defaults(c.get("text_config"), "siglip_text"), _with_defaults(
      c.get("vision_config"), "siglip_vision")
  return dict(image=_tower(v), text=_tower(t), patch=v["patch_size"],
              image_size=v["image_size"], vocab_size=t["vocab_size"],
              max_len=t["max_position_embeddings"], eps=t["layer_norm_eps"],
              activation=_activation(t["hidden_act"]))


def _whisper(c):
  c = _with_defaults(c, "whisper")
  if c.get("activation_function", "gelu") != "gelu":
    raise ValueError(f"config.json: activation_function={c['activation_function']!r}; "
                     "mmjax.pretrained.whisper builds Whisper's exact GELU only.")
  return dict(width=c["d_model"], depth=c["encoder_layers"],
              heads=c["encoder_attention_heads"], mlp_dim=c["encoder_ffn_dim"],
              n_mels=c["num_mel_bins"], max_positions=c["max_source_positions"])


def _bert(c):
  c = _with_defaults(c, "bert")
  if _activation(c["hidden_act"]) != "gelu":
    raise ValueError(f"config.json: hidden_act={c['hidden_act']!r}; mmjax.pretrained.bert "
                     "builds BERT's exact GELU only.")
  return dict(_tower(c), vocab_size=c["vocab_size"], max_len=c["max_position_embeddings"],
              type_vocab_size=c["type_vocab_size"], eps=c["layer_norm_eps"],
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
