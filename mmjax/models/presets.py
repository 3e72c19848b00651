"""Named model sizes: `tiny` (tests), `small` (CPU experiments), `base` (the reference).

`tiny` and `small` take mm_arith's inputs as they are: 28x28x1 digits, one second of 8 kHz
audio, questions of up to 46 bytes (48 tokens with begin/end).

Their audio tokens span the whole mel band (patch_freq = n_mels): a spoken digit is a
pattern across frequencies, and a token that sees only a band cannot tell which band it
is at initialisation (position embeddings start small), which kept an earlier `small`
(8-mel patches, 4x4 image patches) on the chance plateau for 2,000 steps. 7x7 image
patches and full-band audio tokens also make `small` 2x faster per step.

`base` is the reference model the project was asked to reproduce: 12 layers per tower,
d_model 768, 12 heads, MLP 3072, text vocabulary 32000, per-token output over 32000.
"""
from __future__ import annotations

import dataclasses

from mmjax.data.tokenizer import VOCAB_SIZE
from mmjax.models.config import (AudioConfig, FusionConfig, HeadConfig, ImageConfig,
                                 ModelConfig, TextConfig)


def tiny() -> ModelConfig:
  return ModelConfig(
      towers={"text": TextConfig(num_layers=1, vocab_size=VOCAB_SIZE, max_len=48),
              "image": ImageConfig(num_layers=1, image_size=(28, 28), channels=1,
                                   patch_size=7),
              "audio": AudioConfig(num_layers=1, sample_rate=8000, num_samples=8000,
                                   n_fft=256, hop_length=128, n_mels=16, patch_time=4,
                                   patch_freq=16)},
      d_model=32, num_heads=2, mlp_dim=64, mlp_gated=True,
      fusion=FusionConfig("cross", num_layers=1), head=HeadConfig("classify", 10))


def small() -> ModelConfig:
  return ModelConfig(
      towers={"text": TextConfig(num_layers=2, vocab_size=VOCAB_SIZE, max_len=48),
              "image": ImageConfig(num_layers=2, image_size=(28, 28), channels=1,
                                   patch_size=7),
              "audio": AudioConfig(num_layers=2, sample_rate=8000, num_samples=8000,
                                   n_fft=256, hop_length=128, n_mels=32, patch_time=4,
                                   patch_freq=32)},
      d_model=128, num_heads=4, mlp_dim=352, mlp_gated=True,
      fusion=FusionConfig("cross", num_layers=2), head=HeadConfig("classify", 10))


def base() -> ModelConfig:
  return ModelConfig(
      towers={"text": TextConfig(num_layers=12, vocab_size=32000, max_len=128),
              "image": ImageConfig(num_layers=12, image_size=(224, 224), channels=3,
                                   patch_size=16),
              "audio": AudioConfig(num_layers=12, sample_rate=16000, num_samples=16000,
                                   n_fft=400, hop_length=160, n_mels=128, patch_time=4,
                                   patch_freq=16)},
      d_model=768, num_heads=12, mlp_dim=3072,
      fusion=FusionConfig("cross", num_layers=2),
      head=HeadConfig("per_token", num_classes=32000, token_modality="text"))


PRESETS = {"tiny": tiny, "small": small, "base": base}


def get_preset(name: str, modalities=None, **overrides) -> ModelConfig:
  """A preset, optionally restricted to some modalities and with top-level overrides.

  `get_preset("small", modalities=("image", "audio"), fusion=FusionConfig("joint", 2))`
  """
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid presets are {sorted(PRESETS)}.")
  cfg = PRESETS[name]()
  if modalities is not None:
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in cfg.towers]
    if unknown or not modalities:
      raise ValueError(f"modalities={list(modalities)} is invalid for preset {name!r}: "
                       f"choose a non-empty subset of {sorted(cfg.towers)}.")
    cfg = dataclasses.replace(cfg, towers={m: cfg.towers[m] for m in modalities})
    if cfg.head.kind == "per_token" and cfg.head.token_modality not in modalities:
      raise ValueError(f"preset {name!r} has a per-token head over "
                       f"{cfg.head.token_modality!r}, which modalities={list(modalities)} "
                       "drops; keep it or override head=HeadConfig('classify', ...).")
  if overrides:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
      raise ValueError(f"unknown model config field(s) {bad}; valid fields are "
                       f"{sorted(names)}.")
    cfg = dataclasses.replace(cfg, **overrides)
  return cfg.validate()
