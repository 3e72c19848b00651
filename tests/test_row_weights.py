"""Modality-balanced calibration (`post_training/row_weights`): each calibration token
weighted by the task loss's sensitivity to the layer's output there. Against a float64
NumPy backward written here: the per-token weights, MBQ's per-modality means, the weighted
statistics in both calibration modes; a GPTQ whose objective ignores the tokens the loss
ignores reconstructs the others better than plain GPTQ; and the bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import Plan, flatten, formats, layout, rules
from mmjax.compress.post_training import awq, gptq, row_weights, staged, stats

K, H, C, TA, TB = 8, 12, 4, 3, 5


def _two_layer():
  r = np.random.default_rng(0)
  params = {"l1": {"kernel": jnp.asarray(r.normal(size=(K, H)) / 3, jnp.float32)},
            "l2": {"kernel": jnp.asarray(r.normal(size=(H, C)) / 3, jnp.float32)}}

  def apply(p, batch):
    h = jnp.tanh(batch["x"] @ p["l1"]["kernel"])
    return h @ p["l2"]["kernel"], {}

  def loss(out, batch):  # masked tokens do not count
    err = (out[0] - batch["y"]) ** 2
    return jnp.sum(err * batch["m"][..., None]) / err.size
  batches = [{"x": jnp.asarray(r.normal(size=(2, 6, K)), jnp.float32),
              "y": jnp.asarray(r.normal(size=(2, 6, C)), jnp.float32),
              "m": jnp.asarray(r.random((2, 6)) > 0.3, jnp.float32)} for _ in range(2)]
  return params, apply, loss, batches


def _reference_two_layer(params, batches):
  """float64: per batch, the layers' inputs and the loss's gradients at their outputs."""
  w1 = np.asarray(params["l1"]["kernel"], np.float64)
  w2 = np.asarray(params["l2"]["kernel"], np.float64)
  out = []
  for b in batches:
    x, y, m = (np.asarray(b[k], np.float64) for k in ("x", "y", "m"))
    h = np.tanh(x @ w1)
    o = h @ w2
    g2 = 2 * (o - y) * m[..., None] / o.size
    g1 = (g2 @ w2.T) * (1 - h ** 2)
    out.append(dict(x1=x.reshape(-1, K), x2=h.reshape(-1, H),
                    s1=(g1 ** 2).mean(-1).reshape(-1), s2=(g2 ** 2).mean(-1).reshape(-1)))
  return out


def test_token_weights_and_weighted_statistics_match_float64_reference():
  params, apply, loss, batches = _two_layer()
  paths = ["l1/kernel", "l2/kernel"]
  rw = row_weights.weights(apply, params, batches, paths, "token", loss)
  ref = _reference_two_layer(params, batches)
  want = {}
  for layer in ("1", "2"):
    s = [r["s" + layer] for r in ref]
    mean = np.mean(np.concatenate(s))
    for b in range(len(batches)):
      np.testing.assert_allclose(rw[b][f"l{layer}/kernel"][0], s[b] / mean, rtol=2e-4,
                                 atol=1e-6)
    x = np.concatenate([r["x" + layer] for r in ref])
    r_all = np.concatenate(s) / mean
    want[f"l{layer}/kernel"] = dict(gram=(x * r_all[:, None]).T @ x,
                                    absmean=(np.abs(x) * r_all[:, None]).sum(0) / r_all.sum())
  # masked tokens weigh nothing, in both layers
  masked = np.asarray(batches[0]["m"]).reshape(-1) == 0
  assert masked.any() and np.all(rw[0]["l1/kernel"][0][masked] == 0)

  contract_of = lambda path, ndim: layout.contract_axes(None, path, ndim)
  f, _ = stats.program(apply, paths, ("gram", "absmean"), contract_of)
  parallel = stats.finish(stats.accumulate(f, params, batches, rw))
  cut = staged.build(apply, params, list(flatten(params)), batches, paths,
                     [["l1/kernel"], ["l2/kernel"]], ("gram", "absmean"), contract_of,
                     row_weights=rw)
  leaves_of = lambda batch: jax.tree.leaves((params, batch))
  sequential = {**stats.finish(cut.stats(0, leaves_of)), **stats.finish(cut.stats(1, leaves_of))}
  for got in (parallel, sequential):
    for p in paths:
      np.testing.assert_allclose(got[p]["gram"], want[p]["gram"], rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(got[p]["absmean"], want[p]["absmean"], rtol=1e-4, atol=1e-6)
  # unweighted is what it was: every row once
  plain = stats.finish(stats.accumulate(f, params, batches))
  x1 = np.concatenate([r["x1"] for r in ref])
  np.testing.assert_allclose(plain["l1/kernel"]["gram"], x1.T @ x1, rtol=1e-4, atol=1e-5)


def _fusion(scale_b: float = 1.0):
  """Two modalities, each through its own kernel, then concatenated along the tokens into
  one kernel (a fusion's keys): the loss counts modality a's outputs 3x, b's `scale_b`x."""
  r = np.random.default_rng(1)
  params = {"a": {"kernel": jnp.asarray(r.normal(size=(K, K)) / 3, jnp.float32)},
            "b": {"kernel": jnp.asarray(r.normal(size=(K, K)) / 3, jnp.float32)},
            "fuse": {"kernel": jnp.asarray(r.normal(size=(K, H)) / 3, jnp.float32)}}
  coef = np.concatenate([np.full(TA, 3.0), np.full(TB, scale_b)])

  def apply(p, batch):
    ctx = jnp.concatenate([batch["a"] @ p["a"]["kernel"], batch["b"] @ p["b"]["kernel"]], 1)
    return jnp.tanh(ctx @ p["fuse"]["kernel"]), {}

  def loss(out, batch):
    return jnp.mean((out[0] * jnp.asarray(coef)[None, :, None] - batch["y"]) ** 2)

  def groups(path, shape):
    return np.array([0] * TA + [1] * TB) if path == "fuse/kernel" else None
  batches = [{"a": jnp.asarray(r.normal(size=(4, TA, K)), jnp.float32),
              "b": jnp.asarray(r.normal(size=(4, TB, K)) * 3 + 1, jnp.float32),
              "y": jnp.asarray(r.normal(size=(4, TA + TB, H)), jnp.float32)}
             for _ in range(2)]
  return params, apply, loss, groups, batches, coef


def test_modality_weights_are_each_modalitys_mean_sensitivity():
  params, apply, loss, groups, batches, coef = _fusion()
  rw = row_weights.weights(apply, params, batches, ["a/kernel", "b/kernel", "fuse/kernel"],
                           "modality", loss, lambda *_: groups)
  wa, wb, wf = (np.asarray(params[k]["kernel"], np.float64) for k in ("a", "b", "fuse"))
  s = []
  for b in batches:
    ctx = np.concatenate([np.asarray(b["a"], np.float64) @ wa,
                          np.asarray(b["b"], np.float64) @ wb], 1)
    out = np.tanh(ctx @ wf)
    g = 2 * (out * coef[None, :, None] - np.asarray(b["y"], np.float64)) * coef[None, :, None]
    g = g / out.size * (1 - out ** 2)
    s.append((g ** 2).mean(-1))  # [batch, tokens]
  s = np.stack(s)
  mean_a, mean_b, mean = s[..., :TA].mean(), s[..., TA:].mean(), s.mean()
  assert mean_a > 2 * mean_b  # the loss counts a's tokens more: they are more sensitive
  for b in range(len(batches)):
    want = np.broadcast_to(np.array([mean_a] * TA + [mean_b] * TB) / mean, (4, TA + TB))
    np.testing.assert_allclose(rw[b]["fuse/kernel"][0], want.reshape(-1), rtol=2e-4)
    for one in ("a/kernel", "b/kernel"):  # one modality feeds them: one constant weight
      np.testing.assert_array_equal(rw[b][one][0], 1.0)


def test_a_kernel_each_modality_uses_once_gets_each_modalitys_weight():
  """Shared weights (one use per modality): the weights are over every use of the kernel,
  so MBQ's modality weights survive where no use mixes modalities."""
  r = np.random.default_rng(2)
  params = {"shared": {"kernel": jnp.asarray(r.normal(size=(K, H)) / 3, jnp.float32)}}

  def apply(p, batch):
    return [jnp.tanh(batch[m] @ p["shared"]["kernel"]) for m in ("a", "b")], {}

  def loss(out, batch):
    return 9 * jnp.mean((out[0][0] - 1) ** 2) + jnp.mean((out[0][1] - 1) ** 2)
  batches = [{m: jnp.asarray(r.normal(size=(4, n, K)), jnp.float32) for m, n in
              (("a", TA), ("b", TB))} for _ in range(2)]
  rw = row_weights.weights(apply, params, batches, ["shared/kernel"], "modality", loss,
                           lambda *_: (lambda path, shape: None))
  w = np.asarray(params["shared"]["kernel"], np.float64)
  s = {}
  for m, c in (("a", 9.0), ("b", 1.0)):
    per = []
    for b in batches:
      out = np.tanh(np.asarray(b[m], np.float64) @ w)
      g = c * 2 * (out - 1) / out.size * (1 - out ** 2)
      per.append((g ** 2).mean(-1).reshape(-1))
    s[m] = np.concatenate(per)
  mean = np.concatenate([s["a"], s["b"]]).mean()
  for b in range(len(batches)):
    np.testing.assert_allclose(rw[b]["shared/kernel"][0], s["a"].mean() / mean, rtol=2e-4)
    np.testing.assert_allclose(rw[b]["shared/kernel"][1], s["b"].mean() / mean, rtol=2e-4)
  assert s["a"].mean() > 10 * s["b"].mean()


@pytest.mark.parametrize("make", [
    lambda balance: gptq.method(formats.grid("int", 2, granularity="channel"), balance=balance),
    lambda balance: awq.method(formats.grid("int", 2, granularity="channel"), n_grid=10,
                               balance=balance)], ids=["gptq", "awq"])
def test_balanced_calibration_reconstructs_the_tokens_the_loss_sees_better(make):
  """b's outputs do not reach the loss (weight 0) and its inputs are large and shifted:
  plain calibration spends the fused kernel's rounding on them; balanced calibration (MBQ
  and per token alike) does not, so the error on a's tokens is smaller."""
  params, apply, loss, groups, batches, _ = _fusion(scale_b=0.0)
  ctx = np.concatenate([np.concatenate([np.asarray(b["a"]) @ np.asarray(params["a"]["kernel"])
                                        for b in batches]).reshape(-1, K)])
  w = np.asarray(params["fuse"]["kernel"], np.float64)
  err = {}
  for balance in ("none", "modality", "token"):
    plan = Plan(rules([(r"fuse/kernel", make(balance))]))
    p0, cs = plan.start(params, jax.random.PRNGKey(0))
    out, _ = plan.calibrate(apply, p0, cs, batches, loss=loss, row_groups=lambda *_: groups)
    d = w - np.asarray(out["fuse"]["kernel"], np.float64)
    err[balance] = float(np.sum((ctx @ d) ** 2))
  assert err["modality"] < 0.8 * err["none"], err
  assert err["token"] < 0.8 * err["none"], err


def test_bad_inputs_name_the_setting_and_the_fix():
  params, apply, loss, groups, batches, _ = _fusion()
  with pytest.raises(ValueError, match=r"balance='mbq' is unknown; valid: none, modality, token"):
    gptq.method(formats.grid("int", 3), balance="mbq")
  plan = Plan(rules([(r"fuse/kernel", gptq.method(formats.grid("int", 3, granularity="channel"),
                                                  balance="modality"))]))
  p0, cs = plan.start(params, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"gradient of the task loss.*pass loss=fn"):
    plan.calibrate(apply, p0, cs, batches)
  with pytest.raises(ValueError, match=r"no row_groups; use balance='token'"):
    plan.calibrate(apply, p0, cs, batches, loss=loss)
  wrong = lambda path, shape: np.zeros(TA, int) if path == "fuse/kernel" else None
  with pytest.raises(ValueError, match=r"ids of shape \(3,\).*rows \(4, 8\)"):
    plan.calibrate(apply, p0, cs, batches, loss=loss, row_groups=lambda *_: wrong)
  floats = lambda path, shape: np.full(TA + TB, 0.5) if path == "fuse/kernel" else None
  with pytest.raises(ValueError, match=r"must be integers >= 0"):
    plan.calibrate(apply, p0, cs, batches, loss=loss, row_groups=lambda *_: floats)
  with pytest.raises(ValueError, match=r"must return one scalar.*task.loss\(outputs\[0\]"):
    plan.calibrate(apply, p0, cs, batches, loss=lambda o, b: (loss(o, b), {}),
                   row_groups=lambda *_: groups)


@pytest.mark.parametrize("kind", ["cross", "joint"])
def test_mmjax_token_modalities_are_where_each_modalitys_tokens_are(kind):
  """The family's layout, checked against the program: perturbing one modality's input
  changes exactly the rows of the first fusion layer's keys it gives to that modality."""
  from experiments.configs.common import base_config
  from mmjax.compress import intercept
  from mmjax.harness import family
  cfg = base_config(tiny=True)
  cfg.model.fusion["kind"] = kind
  fam = family.from_config(cfg)
  batch = fam.example_batch(2, with_labels=False)
  params = jax.jit(fam.init)(jax.random.PRNGKey(0), batch)
  path = ("fusion/layer_00/text/cross_attn/key/kernel" if kind == "cross"
          else "fusion/block_00/attn/key/kernel")
  groups = fam.row_groups(fam.apply, params, batch)
  grab = jax.jit(lambda b: intercept.observe(fam.apply, [path], lambda d: d.x)(params, b)[path][0])
  base = np.asarray(grab(batch))
  names = sorted(fam.modalities)
  ids = groups(path, base.shape[:2])
  assert ids.shape == (base.shape[1],)
  for i, m in enumerate(names):
    other = dict(batch)
    other[m] = np.asarray(batch[m]) + (7 if m == "text" else 0.5)
    changed = np.any(np.abs(np.asarray(grab(other)) - base) > 1e-6, axis=(0, 2))
    np.testing.assert_array_equal(changed, ids == i, err_msg=m)
  assert groups("image/block_00/attn/key/kernel", (2, 16)) is None
  if kind == "cross":
    assert groups("fusion/layer_00/text/cross_attn/query/kernel", (2, 48)) is None


def test_mmjax_token_modalities_follow_the_tokens_a_plan_prunes():
  """With cross-modal pruning in the plan, the layout is read off the hooked forward: the
  layer after the pruning sees the kept counts, and GPTQ with MBQ calibrates through it."""
  from mmjax.compress.token_prune import kept_count, prune_tokens
  from test_token_prune import tiny_model
  fam, batch, params = tiny_model(fusion_layers=2)
  batch = {**batch, "label": np.zeros(2, np.int32), "example_mask": np.ones(2, bool)}
  prune = prune_tokens(keep=0.5, layer=0)
  plan = Plan(prune)
  _, state = plan.start(params, jax.random.PRNGKey(0))
  hooked = plan.hooked(fam.apply, state)
  layout = fam.row_groups(hooked, params, batch)
  inter = jax.eval_shape(fam.apply, params, batch)[1]
  n = {m: inter[m]["mask"].shape[1] for m in ("audio", "image")}
  key = "fusion/layer_{:02d}/text/cross_attn/key/kernel"
  np.testing.assert_array_equal(layout(key.format(0), (2, n["audio"] + n["image"])),
                                [0] * n["audio"] + [1] * n["image"])
  kept = {m: kept_count(n[m], 0.5) for m in n}
  np.testing.assert_array_equal(layout(key.format(1), (2, kept["audio"] + kept["image"])),
                                [0] * kept["audio"] + [1] * kept["image"])
  from mmjax.harness import task as task_lib, train
  import ml_collections
  task = task_lib.from_config(ml_collections.ConfigDict({}), fam)
  both = Plan(prune, rules([(r"fusion/.*/cross_attn/(key|value)/kernel",
                            gptq.method(formats.grid("int", 3, granularity="channel"),
                                        balance="modality"))]))
  p0, cs = both.start(params, jax.random.PRNGKey(0))
  out, _ = both.calibrate(fam.apply, p0, cs, [batch], *train.calibration_context(fam, task))
  assert not np.array_equal(np.asarray(out["fusion"]["layer_01"]["text"]["cross_attn"]["key"]
                                       ["kernel"]),
                            np.asarray(params["fusion"]["layer_01"]["text"]["cross_attn"]["key"]
                                       ["kernel"]))
