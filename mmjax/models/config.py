"""Model configuration: frozen dataclasses, validated before anything is traced.

A model is a width shared by every tower (so fusion can mix tokens), one tower per
modality (a dict: the keys *are* the modalities), a fusion and a head. `to_dict` /
`from_dict` round-trip through plain dicts so experiment configs (ml_collections) and
checkpoints can carry them.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

TOWER_KINDS = ("text", "image", "audio")
FUSION_KINDS = ("cross", "joint", "bottleneck")
HEAD_KINDS = ("classify", "per_token")
ATTENTION_IMPLS = (None, "reference", "chunked", "xla", "cudnn", "pallas")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  num_layers: int = 1
  vocab_size: int = 259
  max_len: int = 16
  kind: str = "text"


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  num_layers: int = 1
  image_size: tuple = (28, 28)
  channels: int = 1
  patch_size: int = 7
  kind: str = "image"

  @property
  def num_tokens(self):
    return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)


@dataclasses.dataclass(frozen=True)
class AudioConfig:
  """Waveform -> log-mel spectrogram (computed in JAX) -> (time, mel) patches -> blocks."""
  num_layers: int = 1
  sample_rate: int = 8000
  num_samples: int = 4000
  n_fft: int = 256
  hop_length: int = 128
  n_mels: int = 16
  f_min: float = 0.0
  f_max: Optional[float] = None  # None: sample_rate / 2
  patch_time: int = 4
  patch_freq: int = 16
  kind: str = "audio"

  @property
  def num_frames(self):
    return 1 + (self.num_samples - self.n_fft) // self.hop_length

  @property
  def grid(self):
    return self.num_frames // self.patch_time, self.n_mels // self.patch_freq

  @property
  def num_tokens(self):
    t, f = self.grid
    return t * f


_TOWER_CLASSES = {"text": TextConfig, "image": ImageConfig, "audio": AudioConfig}


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  kind: str = "cross"
  num_layers: int = 1
  num_bottleneck: int = 4  # only for kind="bottleneck"


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  kind: str = "classify"
  num_classes: int = 10  # classify: classes; per_token: target vocabulary
  token_modality: str = "text"  # per_token: whose positions get logits


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  towers: Mapping[str, object]
  d_model: int = 32
  num_heads: int = 2
  mlp_dim: int = 64
  fusion: FusionConfig = FusionConfig()
  head: HeadConfig = HeadConfig()
  attention_impl: Optional[str] = None
  dtype: str = "float32"  # compute dtype; parameters stay float32
  gelu_approximate: bool = True
  # GEGLU MLP (Shazeer 2020): gelu(x W1) * (x Wgate), then W2. The product gives every block
  # a direct multiplicative interaction between the features it sums, which mm_arith's
  # label ((a +- b) mod 10: no signal in any one modality) needs to leave the chance
  # plateau; with plain GELU MLPs `small` sat at chance for 2,000+ steps.
  mlp_gated: bool = False
  # width of one attention head; None: d_model // num_heads. Set by structured pruning's
  # export, which keeps head_dim and lowers num_heads.
  head_dim: Optional[int] = None

  @property
  def modalities(self):
    """Sorted modality names: the one deterministic order used everywhere."""
    return tuple(sorted(self.towers))

  def validate(self) -> "ModelConfig":
    _check(isinstance(self.towers, Mapping) and len(self.towers) > 0, "towers",
           self.towers, "a non-empty dict {modality: TextConfig|ImageConfig|AudioConfig}")
    for name, tower in self.towers.items():
      _check(type(tower) in _TOWER_CLASSES.values(), f"towers[{name!r}]", tower,
             f"a tower config of kind {TOWER_KINDS}")
      _check(tower.kind in TOWER_KINDS, f"towers[{name!r}].kind", tower.kind,
             f"one of {TOWER_KINDS}")
      _check(tower.num_layers >= 0, f"towers[{name!r}].num_layers", tower.num_layers, ">= 0")
      _validate_tower(name, tower)
    _check(self.d_model > 0, "d_model", self.d_model, "> 0")
    if self.head_dim is None:
      _check(self.num_heads > 0 and self.d_model % self.num_heads == 0, "num_heads",
             self.num_heads, f"a positive divisor of d_model={self.d_model}")
    else:
      _check(self.num_heads > 0, "num_heads", self.num_heads, "> 0")
      _check(self.head_dim > 0, "head_dim", self.head_dim, "> 0 (or None)")
    _check(self.mlp_dim > 0, "mlp_dim", self.mlp_dim, "> 0")
    _check(self.fusion.kind in FUSION_KINDS, "fusion.kind", self.fusion.kind,
           f"one of {FUSION_KINDS}")
    _check(self.fusion.num_layers >= 0, "fusion.num_layers", self.fusion.num_layers, ">= 0")
    _check(self.fusion.num_bottleneck > 0, "fusion.num_bottleneck",
           self.fusion.num_bottleneck, "> 0")
    _check(self.head.kind in HEAD_KINDS, "head.kind", self.head.kind, f"one of {HEAD_KINDS}")
    _check(self.head.num_classes > 0, "head.num_classes", self.head.num_classes, "> 0")
    if self.head.kind == "per_token":
      _check(self.head.token_modality in self.towers, "head.token_modality",
             self.head.token_modality, f"one of the configured modalities {self.modalities}")
    _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl", self.attention_impl,
           f"one of {ATTENTION_IMPLS}")
    _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
    return self

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["towers"] = {k: dataclasses.asdict(v) for k, v in self.towers.items()}
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> "ModelConfig":
    d = dict(d)
    towers = {}
    for name, t in dict(d.pop("towers")).items():
      t = dict(t)
      kind = t.get("kind", name)
      if kind not in _TOWER_CLASSES:
        raise ValueError(f"towers[{name!r}].kind: unknown modality kind {kind!r}; valid kinds "
                         f"are {TOWER_KINDS}.")
      if "image_size" in t:
        t["image_size"] = tuple(t["image_size"])
      towers[name] = _TOWER_CLASSES[kind](**_known(_TOWER_CLASSES[kind], t, f"towers.{name}"))
    fusion = FusionConfig(**_known(FusionConfig, dict(d.pop("fusion", {})), "fusion"))
    head = HeadConfig(**_known(HeadConfig, dict(d.pop("head", {})), "head"))
    return cls(towers=towers, fusion=fusion, head=head,
               **_known(cls, d, "model")).validate()


def _known(cls, d, where):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(names)}.")
  return d


def _check(ok, field, value, valid):
  if not ok:
    raise ValueError(f"model config field {field!r} = {value!r} is invalid; expected {valid}.")


def _validate_tower(name, t):
  if t.kind == "text":
    _check(t.vocab_size > 0, f"towers[{name!r}].vocab_size", t.vocab_size, "> 0")
    _check(t.max_len > 0, f"towers[{name!r}].max_len", t.max_len, "> 0")
  elif t.kind == "image":
    _check(len(t.image_size) == 2 and all(s > 0 for s in t.image_size),
           f"towers[{name!r}].image_size", t.image_size, "(height, width), both > 0")
    _check(t.patch_size > 0 and all(s % t.patch_size == 0 for s in t.image_size),
           f"towers[{name!r}].patch_size", t.patch_size,
           f"a positive divisor of both image sides {t.image_size}")
    _check(t.channels > 0, f"towers[{name!r}].channels", t.channels, "> 0")
  elif t.kind == "audio":
    _check(t.n_fft > 0 and t.num_samples >= t.n_fft, f"towers[{name!r}].n_fft", t.n_fft,
           f"in 1..num_samples={t.num_samples}")
    _check(t.hop_length > 0, f"towers[{name!r}].hop_length", t.hop_length, "> 0")
    f_max = t.f_max or t.sample_rate / 2
    _check(0 <= t.f_min < f_max <= t.sample_rate / 2, f"towers[{name!r}].f_min/f_max",
           (t.f_min, t.f_max), f"0 <= f_min < f_max <= sample_rate/2 = {t.sample_rate / 2}")
    _check(t.n_mels > 0 and t.patch_freq > 0 and t.n_mels % t.patch_freq == 0,
           f"towers[{name!r}].patch_freq", t.patch_freq,
           f"a positive divisor of n_mels={t.n_mels}")
    _check(0 < t.patch_time <= t.num_frames, f"towers[{name!r}].patch_time", t.patch_time,
           f"in 1..num_frames={t.num_frames}")
