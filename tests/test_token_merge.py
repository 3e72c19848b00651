"""Token merging (ToMe) through module hooks: bipartite soft matching against a float64
NumPy reference; on mmjax's own model, tokens that come in identical pairs merge into
half as many of size 2 and, with proportional attention and size-weighted pooling, the
logits equal the dense model's; on a pretrained-family ViT the class token stays first
and XLA's FLOP count falls; r beyond what a block can merge is a one-line error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import Method, Plan
from mmjax.compress.hooks import HookError
from mmjax.compress.token_merge import bipartite_merge, merge_tokens, mergeable


def reference_merge(x, metric, size, r, keep_first):
  """ToMe's bipartite soft matching, one example at a time, in float64 loops (r = 0: the
  tokens as they are)."""
  if r == 0:
    return x, size
  xs, ss = [], []
  for xe, me, se in zip(x, metric, size):
    m = me / np.maximum(np.linalg.norm(me, axis=-1, keepdims=True), 1e-6)
    a, b = np.arange(0, len(xe), 2), np.arange(1, len(xe), 2)
    best_j, best = np.zeros(len(a), int), np.zeros(len(a))
    for i, ai in enumerate(a):
      s = np.array([m[ai] @ m[bj] if bj >= keep_first else -np.inf for bj in b])
      best_j[i], best[i] = int(np.argmax(s)), s.max()
      if se[ai] == 0:
        best[i] = 2.0
      if ai < keep_first:
        best[i] = -np.inf
    order = np.argsort(-best, kind="stable")
    src, unm = order[:r], np.sort(order[r:])
    xb_w, sb = xe[b] * se[b][:, None], se[b].copy()
    for i in src:
      xb_w[best_j[i]] += xe[a[i]] * se[a[i]]
      sb[best_j[i]] += se[a[i]]
    got = np.isin(np.arange(len(b)), best_j[src])
    xb = np.where((got & (sb > 0))[:, None], xb_w / np.maximum(sb, 1e-30)[:, None], xe[b])
    order = np.argsort(np.concatenate([a[unm], b]))  # the tokens left, in input order
    xs.append(np.concatenate([xe[a][unm], xb])[order])
    ss.append(np.concatenate([se[a][unm], sb])[order])
  return np.stack(xs), np.stack(ss)


@pytest.mark.parametrize("n,r,keep_first", [(11, 3, 1), (12, 6, 0), (9, 2, 3)])
def test_bipartite_merge_matches_numpy(n, r, keep_first):
  rng = np.random.default_rng(n + r)
  x = rng.normal(size=(3, n, 5))
  metric = rng.normal(size=(3, n, 4))
  size = rng.integers(1, 4, size=(3, n)).astype(np.float64)
  size[1, -3:] = 0  # padding
  merge = jax.jit(bipartite_merge, static_argnums=(3, 4))
  got_x, got_s = merge(jnp.asarray(x, jnp.float32), jnp.asarray(metric, jnp.float32),
                                 jnp.asarray(size, jnp.float32), r, keep_first)
  want_x, want_s = reference_merge(x, metric, size, r, keep_first)
  assert got_x.shape == (3, n - r, 5)
  np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=0, atol=0)
  np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_s.sum(1), size.sum(1))  # nothing lost, nothing invented
  if keep_first:  # protected tokens stay first and unmerged, merge after merge
    again_x, again_s = merge(got_x, got_x, got_s, mergeable(n - r, keep_first), keep_first)
    np.testing.assert_array_equal(np.asarray(again_x[:, :keep_first]),
                                  x[:, :keep_first].astype(np.float32))
    np.testing.assert_array_equal(again_s[:, :keep_first], size[:, :keep_first])
  same = bipartite_merge(jnp.asarray(x, jnp.float32), jnp.asarray(metric), jnp.asarray(size), 0)
  np.testing.assert_array_equal(same[0], x.astype(np.float32))  # r = 0: as they are


def _tiny_image_model():
  """The tiny preset's image tower alone, two blocks deep (16 tokens of 7x7 patches)."""
  from experiments.configs.common import base_config
  from mmjax.harness import family
  cfg = base_config(tiny=True, modalities=("image",))
  cfg.model.towers["image"]["num_layers"] = 2
  fam = family.from_config(cfg)
  batch = fam.example_batch(2, with_labels=False)
  params = fam.init(jax.random.PRNGKey(0), batch)
  return fam, batch, params


def test_identical_pairs_merge_losslessly_in_mmjax_model_and_bad_r():
  fam, batch, params = _tiny_image_model()
  # the first two columns of 7x7 patches equal (tokens 4i and 4i+1 of a 4x4 grid), and no
  # position embedding: ToMe's A token 4i matches B token 4i+1 exactly, and merging those
  # 4 pairs leaves 12 tokens, 4 of size 2 (sizes that differ, so proportional attention
  # matters)
  img = np.asarray(batch["image"]).copy()
  img[:, :, 7:14] = img[:, :, :7]
  batch = {**batch, "image": jnp.asarray(img)}
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["image"]["pos_embed"] = jnp.zeros_like(params["image"]["pos_embed"])
  dense = jax.jit(fam.apply)(params, batch)[0]

  n = params["image"]["pos_embed"].shape[0]
  plan = Plan(merge_tokens(r=(4, 0), blocks=r"image/block_\d+", tower="image"))
  plan.check_hooks(fam.apply, params, {}, batch)
  merged_logits, inter = jax.jit(plan.wrap(fam.apply, {}, list(params)))(params, batch)
  assert inter["image"]["final"].shape[1] == n - 4
  np.testing.assert_array_equal(np.sort(np.asarray(inter["image"]["size"]), axis=1),
                                [[1.0] * 8 + [2.0] * 4] * 2)
  np.testing.assert_allclose(merged_logits, dense, rtol=2e-5, atol=2e-5)

  # calibration (GPTQ's statistics, say) sees the merged tokens the model will run on
  seen = []
  spy = Method("spy", calibrate=lambda leaves, st, cal: (
      seen.append(cal.apply_fn(cal.params, batch)[1]["image"]["final"].shape), ({}, st))[1])
  both = Plan(plan.parts + [spy])
  both.calibrate(fam.apply, params, both.init(params, jax.random.PRNGKey(0)), [batch])
  assert seen == [(2, n - 4, inter["image"]["final"].shape[2])]

  # without proportional attention in the tower, the same merge moves the logits
  plain = Plan(merge_tokens(r=(4, 0), blocks=r"image/block_\d+", tower="image",
                            attention=None))
  moved = jax.jit(plain.wrap(fam.apply, {}, list(params)))(params, batch)[0]
  assert float(jnp.abs(moved - dense).max()) > 1e-3

  # r beyond what a block can merge: one line before anything runs
  plan = Plan(merge_tokens(r=(4, 13), blocks=r"image/block_\d+", tower="image"))
  with pytest.raises(HookError, match=r"'tome': r=13 is more than the 12 tokens block "
                     r"image/block_01 has; set r <= 6"):
    plan.check_hooks(fam.apply, params, {}, batch)
  # within the tokens a block has, r is capped at half of them, as in ToMe: 16 -> 9 -> 4
  capped = Plan(merge_tokens(r=7, blocks=r"image/block_\d+", tower="image"))
  shapes = jax.eval_shape(capped.wrap(fam.apply, {}, list(params)), params, batch)[1]
  assert shapes["image"]["final"].shape[1] == 4
  short = Plan(merge_tokens(r=(4,), blocks=r"image/block_\d+", tower="image"))
  with pytest.raises(HookError, match="give one r per block"):
    short.check_hooks(fam.apply, params, {}, batch)
  with pytest.raises(ValueError, match="must be an int >= 0"):
    merge_tokens(r=-1, blocks="x")
  assert mergeable(197, keep_first=1) == 98 and mergeable(3, keep_first=2) == 0


def _compiled(fn, *args):
  """fn compiled for args, and the FLOPs XLA's cost analysis counts in it."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  return compiled, float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_pretrained_vit_keeps_its_class_token_and_costs_less_and_whisper_merges():
  from mmjax.pretrained import vit
  model = vit.ViT(width=32, depth=3, heads=2, mlp_dim=64, patch=4, image_size=32, channels=3,
                  num_classes=5, eps=1e-6)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), {"image": images})["params"]
  apply = lambda p, b: model.apply({"params": p}, b)
  plan = Plan(merge_tokens(r=12, blocks=r"block_\d+", keep_first=1))
  plan.check_hooks(apply, params, {}, {"image": images})
  hooked, merged = _compiled(lambda p, x: plan.wrap(apply, {}, list(params))(p, {"image": x}),
                             params, images)
  dense_fn, dense = _compiled(lambda p, x: apply(p, {"image": x}), params, images)
  logits, inter = hooked(params, images)
  assert logits.shape == (2, 5)
  assert [inter[f"block_{i:02d}"].shape[1] for i in range(3)] == [53, 41, 29]
  # block 0's class token is computed before any merge, so it is the dense one
  np.testing.assert_allclose(inter["block_00"][:, 0], dense_fn(params, images)[1]["block_00"][:, 0],
                             rtol=1e-5, atol=1e-5)
  # attention on 65, 53, 41 tokens and MLPs on 53, 41, 29 (merged between them)
  assert merged < 0.8 * dense, merged / dense

  # the same hooks on the pretrained Whisper encoder (the same blocks, no class token)
  from mmjax.pretrained import whisper
  enc = whisper.WhisperEncoder(whisper.resolve(dict(variant=None, width=32, depth=2, heads=2,
                                                    mlp_dim=64, n_mels=8, max_positions=32)))
  mel = jax.random.normal(jax.random.PRNGKey(2), (2, 40, 8))
  wparams = jax.jit(enc.init)(jax.random.PRNGKey(0), {"mel": mel})["params"]
  wapply = lambda p, b: enc.apply({"params": p}, b)
  wplan = Plan(merge_tokens(r=4, blocks=r"block_\d+"))
  wplan.check_hooks(wapply, wparams, {}, {"mel": mel})
  _, winter = jax.eval_shape(wplan.wrap(wapply, {}, list(wparams)), wparams, {"mel": mel})
  assert [winter[f"block_{i:02d}"].shape[1] for i in range(2)] == [16, 12]  # of 20


def test_a_family_that_pools_its_class_token_needs_keep_first():
  from mmjax.compress import flatten
  from mmjax.methods import registry
  from mmjax.pretrained import vit
  fam = vit.family(dict(variant=None, width=32, depth=2, heads=2, mlp_dim=64, patch=16))
  ctx = registry.Context({p: s.shape for p, s in flatten(fam.abstract_params()).items()}, fam)
  _, bad = registry.parse("tokens", {"method": "tome", "blocks": r"block_\d+"})
  with pytest.raises(ValueError, match=r"config.compress.tokens.keep_first=0 would merge the "
                     r"class token that mmjax.pretrained.vit pools; set keep_first=1"):
    bad.build(ctx, "config.compress.tokens")
  _, good = registry.parse("tokens", {"method": "tome", "blocks": r"block_\d+", "keep_first": 1})
  assert good.build(ctx, "config.compress.tokens").hooks
