"""Cross-modal token pruning through module hooks, on mmjax's model (two cross-fusion
layers): the tokens kept after layer 0 are the top ones by the text's attention,
recomputed here in float64 NumPy from the model's own intermediates and parameters; the
later layer and the pooling see only those; keep = 1 is the dense model; pruned at a
tower block instead, the tower's later blocks see only the kept tokens too; bad settings
are one-line errors before anything runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import Plan
from mmjax.compress.hooks import HookError
from mmjax.compress.token_prune import kept_count, prune_tokens, prune_tower_tokens

KEEP = 0.3


def tiny_model(fusion_layers=2, tower_layers=1):
  """The tiny preset with `fusion_layers` cross-fusion layers and `tower_layers` blocks in
  the image and audio towers; audio padded in example 0."""
  from experiments.configs.common import base_config
  from mmjax.harness import family
  cfg = base_config(tiny=True)
  cfg.model.fusion["num_layers"] = fusion_layers
  for m in ("image", "audio"):
    cfg.model.towers[m]["num_layers"] = tower_layers
  fam = family.from_config(cfg)
  batch = fam.example_batch(2, with_labels=False)
  batch["audio_mask"] = np.arange(batch["audio"].shape[1])[None] < np.array([[6000], [8000]])
  params = jax.jit(fam.init)(jax.random.PRNGKey(0), batch)
  return fam, batch, params


def _ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def reference_text_maps(params, inter, heads, layer="layer_00"):
  """The text's cross-attention over [audio; image] in fusion `layer`, averaged over heads,
  in float64 from the model's parameters and the tokens that layer received."""
  f64 = lambda t: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), t)
  inter = f64(inter)
  ctx = np.concatenate([inter["audio"]["final"], inter["image"]["final"]], 1)
  cmask = np.concatenate([inter["audio"]["mask"], inter["image"]["mask"]], 1) > 0
  return _reference_maps(params["fusion"][layer]["text"], inter["text"]["final"], ctx, cmask,
                         heads)


def _reference_maps(p, text, ctx, cmask, heads):
  """softmax(q kᵀ/√d_h) of the text's queries over `ctx` through the cross-attention `p`'s
  LayerNorms and projections, averaged over heads, float64: [b, nq, nk]."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  text, ctx = np.asarray(text, np.float64), np.asarray(ctx, np.float64)
  dense = lambda x, d: x @ d["kernel"] + d["bias"]
  q = dense(_ln(text, p["ln_query"]), p["cross_attn"]["query"])
  k = dense(_ln(ctx, p["ln_context"]), p["cross_attn"]["key"])
  b, nq, inner = q.shape
  hd = inner // heads
  logits = np.einsum("bqhd,bkhd->bhqk", q.reshape(b, nq, heads, hd),
                     k.reshape(b, -1, heads, hd)) / np.sqrt(hd)
  logits = np.where(cmask[:, None, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return (probs / probs.sum(-1, keepdims=True)).mean(1)  # [b, nq, nk]


def _reference_kept(params, inter, heads, keep):
  """Top tokens of audio and image by the text's layer-0 cross-attention, float64."""
  probs = reference_text_maps(params, inter, heads)
  w = np.asarray(inter["text"]["mask"], np.float64)
  score = (probs * w[..., None]).sum(1) / w.sum(1)[:, None]
  n_audio = inter["audio"]["final"].shape[1]
  out = {}
  for m, seg in (("audio", score[:, :n_audio]), ("image", score[:, n_audio:])):
    count = kept_count(seg.shape[1], keep)
    out[m] = np.sort(np.argsort(-seg, axis=1, kind="stable")[:, :count], axis=1)
  return out


def test_kept_tokens_are_the_texts_top_attended_in_the_fusion_or_a_tower():
  """In the fusion: keep=1 is the dense model. At tower block 0: the tokens kept are the
  top ones by the text tower's output through fusion layer 0's projections over block 0's
  tokens (float64 NumPy here), and the tower's next block, its output mask and the fusion
  see only those."""
  fam, batch, params = tiny_model(tower_layers=2)
  dense_logits, dense_inter = jax.jit(fam.apply)(params, batch)
  plan = Plan(prune_tokens(KEEP))
  plan.check_hooks(fam.apply, params, {}, batch)
  logits, inter = jax.jit(plan.wrap(fam.apply, {}, list(params)))(params, batch)
  want = _reference_kept(params, dense_inter, fam.args["num_heads"], KEEP)
  for m in ("audio", "image"):
    n = dense_inter[m]["final"].shape[1]
    got = inter["fusion"]["layer_00"][m]
    assert got.shape[1] == kept_count(n, KEEP) <= 0.3 * n + 1
    np.testing.assert_allclose(got, np.take_along_axis(
        np.asarray(dense_inter["fusion"]["layer_00"][m]), want[m][..., None], 1),
        rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(inter["fusion"]["masks"][m], np.take_along_axis(
        np.asarray(dense_inter[m]["mask"]), want[m], 1))
    assert inter["fusion"]["layer_01"][m].shape[1] == got.shape[1]  # the later layer too
  # the padded audio of example 0 goes first: every token it kept is real
  assert bool(np.all(inter["fusion"]["masks"]["audio"][0]))
  assert float(jnp.abs(logits - dense_logits).max()) > 1e-4

  everything = Plan(prune_tokens(1.0))
  np.testing.assert_allclose(jax.jit(everything.wrap(fam.apply, {}, list(params)))(
      params, batch)[0], dense_logits, rtol=1e-5, atol=1e-5)

  with pytest.raises(HookError, match=r"'xprune': the model has no modality 'video' \(its "
                     r"modalities: \['audio', 'image', 'text'\]\)"):
    Plan(prune_tokens(KEEP, prune=("video",))).check_hooks(fam.apply, params, {}, batch)
  for keep in (0, 1.5, -0.2):
    with pytest.raises(ValueError, match=rf"keep={keep} must be in \(0, 1\]"):
      prune_tokens(keep)
  with pytest.raises(ValueError, match="must name modalities other than the queries'"):
    prune_tokens(KEEP, prune=("text",))

  # tower mode
  dense, heads = dense_inter, fam.args["num_heads"]
  plan = Plan(prune_tower_tokens(KEEP, block=0))
  plan.check_hooks(fam.apply, params, {}, batch)
  logits, inter = jax.jit(plan.wrap(fam.apply, {}, list(params)))(params, batch)
  w = np.asarray(dense["text"]["mask"], np.float64)
  for m in ("audio", "image"):
    x, mask = np.asarray(dense[m]["block_00"]), np.asarray(dense[m]["mask"])
    probs = _reference_maps(params["fusion"]["layer_00"]["text"], dense["text"]["final"], x,
                            mask, heads)
    score = (probs * w[..., None]).sum(1) / w.sum(1)[:, None]
    count = kept_count(x.shape[1], KEEP)
    want = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :count], axis=1)
    np.testing.assert_allclose(inter[m]["block_00"], np.take_along_axis(x, want[..., None], 1),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(inter[m]["mask"], np.take_along_axis(mask, want, 1))
    assert inter[m]["block_01"].shape[1] == inter["fusion"]["layer_00"][m].shape[1] == count
  assert bool(np.all(inter["audio"]["mask"][0]))  # example 0's padding went first
  assert float(jnp.abs(logits - dense_logits).max()) > 1e-4
  with pytest.raises(HookError, match=r"'xprune': tower 'audio' has no block 2 \(block_02\)"):
    Plan(prune_tower_tokens(KEEP, block=2)).check_hooks(fam.apply, params, {}, batch)
  with pytest.raises(ValueError, match=r"block=-1 must be a tower block index >= 0"):
    prune_tower_tokens(KEEP, block=-1)


def test_token_methods_by_config_composed_and_bad_settings(procedural_dir, tiny_dense_dir,
                                                           tmp_path):
  """ToMe in the towers and cross-modal pruning in the fusion, one plan, trained a few
  steps from a dense run; each bad setting is one line and writes nothing."""
  import json
  import os

  from experiments.configs import tome, xprune
  from experiments.configs.common import section
  from mmjax.harness import train

  def config(arg, merge=None):
    c = xprune.get_config(arg)
    c.data.data_dir, c.mesh.data, c.init = procedural_dir, 1, tiny_dense_dir
    c.train.steps = 4
    if merge:
      c.compress.merge = section("tome", **merge)
    return c

  workdir = str(tmp_path / "ok")
  out = train.train_and_evaluate(config("tiny,keep=0.5", dict(r=1)), workdir,
                                 log=lambda *_: None)
  with open(os.path.join(workdir, "compression_report.json")) as f:
    assert json.load(f)["accuracy"] == out["eval_accuracy"]
  assert tome.get_config("tiny,r=2,steps=0").train.steps == 0
  for arg, merge, message in (
      ("tiny,keep=1.5", None, r"config.compress.tokens.keep=1.5 must be in \(0, 1\]"),
      ("tiny,layer=3", None, r"config.compress.tokens.layer=3: the fusion has no "
                             r"cross-attention layer 3 whose 'text' tokens query the others "
                             r"\(its layers: \['layer_00'\]"),
      ("tiny,block=3", None, r"config.compress.tokens.block=3: tower 'image' has no block 3 "
                             r"\(its blocks: \['block_00'\]\)"),
      ("tiny", dict(modalities=("video",)), r"config.compress.merge.modalities=\['video'\]: "
                                            r"the model has no tower 'video'")):
    bad = str(tmp_path / arg.replace(",", "_"))
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(config(arg, merge), bad, log=lambda *_: None)
    assert not os.path.exists(bad)
