"""Structured pruning: whole heads / MLP units go, and the physically shrunk model gives
the masked model's outputs."""
import jax
import numpy as np
import pytest

from mmjax.compress import Plan, flatten, rules
from mmjax.compress import structured
from mmjax.models import structure
from mmjax.models import FusionConfig, MultimodalModel, get_preset, random_inputs


def _model(fusion="cross"):
  cfg = get_preset("tiny", num_heads=4, fusion=FusionConfig(fusion, 1))
  model = MultimodalModel(cfg)
  x = random_inputs(cfg, 3, seed=1)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  r = np.random.default_rng(0)  # a non-zero head so that logits can differ
  params = {**params, "head": {**params["head"],
                               "kernel": r.normal(size=params["head"]["kernel"].shape)}}
  return cfg, model, params, x


@pytest.mark.parametrize("unit, sparsity, fusion", [("head", 0.5, "cross"),
                                                    ("mlp", 0.75, "joint"),
                                                    ("head", 0.25, "bottleneck")])
def test_shrunk_model_matches_the_masked_one(unit, sparsity, fusion):
  cfg, model, params, x = _model(fusion)
  paths = list(flatten(params))
  pattern = structure.HEAD_PATTERN if unit == "head" else structure.MLP_PATTERN
  layout = structure.head_layout(4) if unit == "head" else structure.mlp_layout()
  plan = Plan(rules([(pattern, structured.units(sparsity, layout, what=unit))], paths))
  started, state = plan.start(params, jax.random.PRNGKey(0))
  view = plan.view(started, state)
  masked_logits, _ = model.apply({"params": view}, x)
  small, small_cfg = structure.shrink(view, plan.describe(params, state), cfg)
  if unit == "head":
    assert small_cfg.num_heads == 4 - round(sparsity * 4) and small_cfg.head_dim == 8
  else:
    assert small_cfg.mlp_dim == 64 - round(sparsity * 64)
  n_small = sum(np.size(a) for a in jax.tree.leaves(small))
  assert n_small < sum(np.size(a) for a in jax.tree.leaves(params))
  small_logits, _ = MultimodalModel(small_cfg).apply({"params": small}, x)
  np.testing.assert_allclose(np.asarray(small_logits), np.asarray(masked_logits),
                             rtol=1e-5, atol=1e-5)
  # and the masked model really lost something: its logits differ from the dense model's
  dense_logits, _ = model.apply({"params": params}, x)
  assert np.abs(np.asarray(dense_logits) - np.asarray(masked_logits)).max() > 1e-4


def test_heads_with_the_largest_norm_survive():
  cfg, model, params, x = _model()
  flat = flatten(params)
  path = "text/block_00/attn"
  boosted = dict(flat)
  k = np.asarray(flat[f"{path}/value/kernel"]).copy()
  k[:, 24:32] *= 100.0  # head 3 of 4 (head_dim 8)
  boosted[f"{path}/value/kernel"] = k
  t = structured.units(0.75, structure.head_layout(4), what="head")
  sub = {p: w for p, w in boosted.items() if p.startswith(path)}
  state = t.init(sub, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(state["units"][path]), [False, False, False, True])


def test_removing_every_head_is_an_error():
  shapes = {"a/attn/query/kernel": (32, 32), "a/attn/out/kernel": (32, 32)}
  with pytest.raises(ValueError, match="would remove every head"):
    Plan(structured.units(0.9, structure.head_layout(4), what="head")).check(shapes)
