"""mmjax's own multimodal models as a model module (`config.model_module`, the default):
`config.model` is a `ModelConfig` as a dict (`presets.py`), validated here.

Its defaults for compression: every Dense kernel of every transformer block (towers and
fusion) for pruning and the post-training methods, not embeddings or the head; every
parameter for weight quantization ("int8 everywhere": matrices per output channel,
vectors (biases, LayerNorm, position tables' rows) per tensor: in a d=128 model the
vectors are 1.4% of the weights but would be 5% of an int8 export left in fp32); every
matmul weight for activation quantization except the patch embeddings, which are
convolutions whose inputs stay float.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from mmjax.harness.family import Family
from mmjax.models import structure
from mmjax.models.config import ModelConfig
from mmjax.models.multimodal import MultimodalModel
from mmjax.models.random_inputs import random_inputs

PRUNE_PATTERN = r".*/(attn|cross_attn|mlp)/\w+/kernel"
QUANT_PATTERN = r".*"
ACT_PATTERN = r"(?!(image|audio)/patch_embed/).*/kernel"
PATTERNS = {"matmul": PRUNE_PATTERN, "weights": QUANT_PATTERN, "activations": ACT_PATTERN}
UNIT_TYPES = {"attention": r"(text|image|audio)/.*/attn/\w+/kernel",
              "mlp": r".*/mlp/\w+/kernel",
              "cross_attention": r"fusion/.*/cross_attn/\w+/kernel"}


def family(args: dict) -> Family:
  cfg = ModelConfig.from_dict(args)
  model = MultimodalModel(cfg)

  def init(rng, batch):
    return model.init(rng, batch)["params"]

  def apply(params, batch, rng=None):
    return model.apply({"params": params}, batch,
                       rngs={"dropout": rng} if rng is not None else {})

  def example_batch(batch_size, data=None, seed=0, with_labels=True):
    return random_inputs(cfg, batch_size, seed=seed, with_labels=with_labels,
                         text_len=data.text_len if data is not None else None)

  def structured_units(unit):
    if unit == "heads":
      return structure.HEAD_PATTERN, structure.head_layout(cfg.num_heads)
    return structure.MLP_PATTERN, structure.mlp_layout()

  def shrink(view_params, describe, out_dir):
    small, small_cfg = structure.shrink(view_params, describe, cfg)
    n = structure.save_shrunk(out_dir, small, small_cfg)
    return dict(shrunk_dir=os.path.abspath(out_dir), shrunk_parameters=n,
                shrunk_model=dict(num_heads=small_cfg.num_heads, head_dim=small_cfg.head_dim,
                                  mlp_dim=small_cfg.mlp_dim))

  def row_groups(apply_fn, params, batch):
    return token_modalities(cfg, jax.eval_shape(apply_fn, params, batch)[1])

  classify = cfg.head.kind == "classify"
  return Family(
      "mmjax.multimodal", init, apply, example_batch, cfg.modalities, PATTERNS,
      labels=tuple(str(i) for i in range(cfg.head.num_classes)) if classify else None,
      output_mask=None if classify else f"{cfg.head.token_modality}_mask",
      structured_units=structured_units, shrink=shrink, unit_types=UNIT_TYPES,
      row_groups=row_groups, args=cfg.to_dict())


def token_modalities(cfg: ModelConfig, inter: dict):
  """-> groups(path, row shape): the modality (its index in sorted order) of each token a
  fusion kernel sees, for modality-balanced calibration; None for a kernel one modality
  feeds (a tower's, a cross layer's queries and MLP). `inter`: the forward's intermediates
  (shapes suffice), which give each layer's token counts as the calibration forward has
  them, after token merging in the towers or pruning in the fusion. The layouts are the
  fusion's (`models/fusion.py`): a cross layer's keys and values see the other modalities
  concatenated in sorted order, a joint block all of them, a bottleneck layer its
  modality's tokens then the shared ones (one more id)."""
  names = sorted(m for m in cfg.modalities)
  index = {m: i for i, m in enumerate(names)}
  towers = {m: inter[m]["mask"].shape[1] for m in names}
  kind = cfg.fusion.kind

  def counts_into(layer: int) -> dict:
    """Tokens per modality entering fusion layer `layer` (cross, bottleneck)."""
    if layer == 0:
      return towers
    prev = inter["fusion"][f"layer_{layer - 1:02d}"]
    prev = prev["tokens"] if kind == "bottleneck" else prev
    return {m: prev[m].shape[1] for m in names}

  def ids(ms, counts):
    return np.concatenate([np.full(counts[m], index[m]) for m in ms])

  def groups(path, shape):
    parts = path.split("/")
    if parts[0] != "fusion" or len(parts) < 3:
      return None
    if kind == "joint":
      found = ids(names, towers)
    else:
      counts = counts_into(int(parts[1].rsplit("_", 1)[-1]))
      if kind == "bottleneck":
        found = np.concatenate([ids([parts[2]], counts),
                                np.full(cfg.fusion.num_bottleneck, len(names))])
      elif parts[3:4] == ["cross_attn"] and parts[4:5] in (["key"], ["value"]):
        found = ids([o for o in names if o != parts[2]] or [parts[2]], counts)
      else:
        return None
    if shape[-1] != found.size:
      raise ValueError(f"balance='modality': {path}'s input has {shape[-1]} tokens but the "
                       f"fusion's layout gives {found.size}; a hook that reorders or resizes "
                       "the fusion's tokens needs balance='token'.")
    return found
  return groups


def of(cfg: ModelConfig) -> Family:
  """The family of a ModelConfig already in hand (benchmarks, tests)."""
  return family(cfg.to_dict())


def model_config(family_: Family) -> ModelConfig:
  """The ModelConfig of a family this module built (benchmarks and tests that need it)."""
  return ModelConfig.from_dict(family_.args)
