"""Multimodal encoders: shapes, paths, padding, parameter counts, determinism, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import (FusionConfig, HeadConfig, ModelConfig, MultimodalModel, TextConfig,
                          get_preset, random_inputs)

FUSIONS = ("cross", "joint", "bottleneck")


def _init(cfg, batch=3, seed=0):
  x = random_inputs(cfg, batch, seed=seed)
  model = MultimodalModel(cfg)
  return model, jax.jit(model.init)(jax.random.key(seed), x), x


def _paths(tree):
  return ["/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ----------------------------------------------------------------------------- parameter counts

def _dense(i, o):
  return i * o + o


def _expected_params(cfg: ModelConfig) -> int:
  """Closed-form parameter count, written from the architecture, not from the code."""
  d, m = cfg.d_model, cfg.mlp_dim
  ln = 2 * d
  attn = 4 * _dense(d, d)
  mlp = _dense(d, m) * (2 if cfg.mlp_gated else 1) + _dense(m, d)  # GEGLU adds a gate
  enc = 2 * ln + attn + mlp
  cross = 3 * ln + attn + mlp
  total = 0
  for t in cfg.towers.values():
    if t.kind == "text":
      front = t.vocab_size * d + t.max_len * d
    elif t.kind == "image":
      n = (t.image_size[0] // t.patch_size) * (t.image_size[1] // t.patch_size)
      front = t.patch_size ** 2 * t.channels * d + d + n * d
    else:
      frames = 1 + (t.num_samples - t.n_fft) // t.hop_length
      n = (frames // t.patch_time) * (t.n_mels // t.patch_freq)
      front = t.patch_time * t.patch_freq * d + d + n * d
    total += front + t.num_layers * enc + ln
  k, f = len(cfg.towers), cfg.fusion
  total += {"cross": f.num_layers * k * cross,
            "joint": k * d + f.num_layers * enc,
            "bottleneck": f.num_bottleneck * d + f.num_layers * k * enc}[f.kind]
  width = k * d if cfg.head.kind == "classify" else d
  return total + 2 * width + _dense(width, cfg.head.num_classes)


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_parameter_count_matches_closed_form(preset):
  cfg = get_preset(preset)
  x = random_inputs(cfg, 1, text_len=8)
  shapes = jax.eval_shape(MultimodalModel(cfg).init, jax.random.key(0), x)
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert count == _expected_params(cfg)
  if preset == "small":
    assert 1e6 < count < 10e6, "small should have a few million parameters"


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("modalities", [("text",), ("image", "audio"),
                                        ("text", "image", "audio")])
def test_shapes_counts_and_any_modality_subset(fusion, modalities):
  cfg = get_preset("tiny", modalities=modalities, fusion=FusionConfig(fusion, 2))
  model, params, x = _init(cfg)
  logits, inter = jax.jit(model.apply)(params, x)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  count = sum(p.size for p in jax.tree.leaves(params))
  assert count == _expected_params(cfg)
  for m in modalities:
    assert inter[m]["final"].shape[-1] == cfg.d_model
    assert "block_00" in inter[m] and "mask" in inter[m]


def test_parameter_paths_are_readable_and_stable():
  cfg = get_preset("tiny", towers={**get_preset("tiny").towers,
                                   "text": TextConfig(num_layers=4, max_len=16)})
  _, params, _ = _init(cfg)
  paths = _paths(params["params"])
  for p in ("text/block_03/attn/query/kernel", "text/block_00/mlp/fc1/kernel",
            "image/patch_embed/kernel", "audio/pos_embed", "text/token_embed/embedding",
            "fusion/layer_00/text/cross_attn/key/kernel", "head/kernel"):
    assert p in paths, f"{p} missing; have e.g. {paths[:5]}"


def test_per_token_head():
  cfg = get_preset("tiny", head=HeadConfig("per_token", num_classes=300,
                                           token_modality="text"))
  model, params, x = _init(cfg)
  logits, _ = model.apply(params, x)
  assert logits.shape == (3, cfg.towers["text"].max_len, 300)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_padding_content_changes_nothing(fusion):
  cfg = get_preset("tiny", fusion=FusionConfig(fusion, 1))
  model, params, x = _init(cfg, batch=4)
  rng = np.random.default_rng(1)
  y = dict(x)
  y["text"] = np.where(x["text_mask"], x["text"],
                       rng.integers(3, 259, x["text"].shape)).astype(np.int32)
  y["audio"] = np.where(x["audio_mask"], x["audio"],
                        rng.normal(size=x["audio"].shape)).astype(np.float32)
  assert (y["text"] != x["text"]).any() and (y["audio"] != x["audio"]).any()
  apply = jax.jit(model.apply)
  a, ia = apply(params, x)
  b, ib = apply(params, y)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  for m in ("text", "audio"):
    valid = np.asarray(ia[m]["mask"])
    np.testing.assert_allclose(np.asarray(ia[m]["final"])[valid],
                               np.asarray(ib[m]["final"])[valid], atol=1e-6)


def test_extra_text_padding_changes_nothing():
  cfg = get_preset("tiny", fusion=FusionConfig("joint", 1))
  model, params, x = _init(cfg, batch=2)
  short = dict(x)
  short["text"] = np.zeros((2, 8), np.int32)
  short["text"][:, :5] = x["text"][:, :5] + (x["text"][:, :5] == 0) * 7
  short["text_mask"] = short["text"] != 0
  long = dict(short)
  long["text"] = np.pad(short["text"], ((0, 0), (0, 8)))
  long["text_mask"] = long["text"] != 0
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(np.asarray(apply(params, short)[0]),
                             np.asarray(apply(params, long)[0]), atol=1e-6)


def test_deterministic_under_a_fixed_seed():
  cfg = get_preset("tiny")
  model, p1, x = _init(cfg, seed=3)
  _, p2, _ = _init(cfg, seed=3)
  _, p3, _ = _init(cfg, seed=4)
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p1, p2)
  assert all(jax.tree.leaves(same))
  assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                              p1, p3)))
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(np.asarray(apply(p1, x)[0]), np.asarray(apply(p2, x)[0]))


def test_config_round_trips_through_dicts():
  cfg = get_preset("small", fusion=FusionConfig("bottleneck", 2, num_bottleneck=3))
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- bad input

def test_unknown_preset_and_modality():
  with pytest.raises(ValueError, match="unknown model preset 'huge'.*'base', 'small', 'tiny'"):
    get_preset("huge")
  with pytest.raises(ValueError, match="non-empty subset of"):
    get_preset("tiny", modalities=("text", "video"))
  with pytest.raises(ValueError, match="unknown modality kind 'video'"):
    ModelConfig.from_dict({**get_preset("tiny").to_dict(),
                           "towers": {"video": {"num_layers": 1}}})


@pytest.mark.parametrize("overrides,needle", [
    (dict(num_heads=3), "'num_heads' = 3"),
    (dict(fusion=FusionConfig("concat", 1)), "'fusion.kind' = 'concat'"),
    (dict(head=HeadConfig("regress", 1)), "'head.kind' = 'regress'"),
    (dict(attention_impl="flash"), "'attention_impl' = 'flash'"),
    (dict(dtype="int8"), "'dtype' = 'int8'"),
    (dict(d_modell=8), "unknown model config field"),
])
def test_invalid_config_fields(overrides, needle):
  with pytest.raises(ValueError) as err:
    get_preset("tiny", **overrides)
  assert needle in str(err.value)


def test_bad_inputs_raise_before_compilation():
  cfg = get_preset("tiny")
  model, params, x = _init(cfg)
  cases = [
      ({k: v for k, v in x.items() if k != "audio"}, "inputs lack modalities ['audio']"),
      ({**x, "image": np.zeros((3, 32, 32, 1), np.float32)}, "image input must be"),
      ({**x, "text": np.zeros((3, 60), np.int32), "text_mask": None}, "exceeds the tower's"),
      ({**x, "text": x["text"].astype(np.float32)}, "integer tokens"),
      ({**x, "audio": x["audio"][:, :100], "audio_mask": None}, "audio input must be"),
      ({**x, "audio_mask": x["audio_mask"][:, :10]}, "audio mask shape"),
  ]
  apply = jax.jit(model.apply)
  for inputs, needle in cases:
    inputs = {k: v for k, v in inputs.items() if v is not None}
    with pytest.raises(ValueError) as err:
      apply.lower(params, inputs)
    assert needle in str(err.value)
