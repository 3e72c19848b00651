"""Compression of models mmjax did not write, through the public API only: a Flax linen
ViT-style classifier (nn.MultiHeadDotProductAttention: 3-D DenseGeneral kernels), a Flax
NNX model, and a plain function over a hand-made params dict.

Each gets the whole kit at once: gradual magnitude pruning to 90% + 2:4 on a subset +
int8 weight QAT + int8 activations (real int8 x int8 -> int32 products) + logit
distillation from a dense teacher, trained a few dozen steps on a small synthetic task;
then its export (codes, masks, activation scales) must reproduce the evaluated logits.
docs/guides/own_model.md's "Compressing your own model" snippets are read from it and run here."""
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from mmjax.compress import Plan, activations, distill, export, flatten, layout, pruning, quant
from mmjax.compress import rules, step, storage, unflatten

CLASSES, DIM = 4, 16


def _task(n=256, seed=0):
  """x [n, 16] -> the argmax of a fixed random linear map: learnable in a few dozen steps."""
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, DIM)).astype(np.float32)
  y = np.argmax(x @ np.random.default_rng(99).normal(size=(DIM, CLASSES)), -1)
  return jnp.asarray(x), jnp.asarray(y)


# ------------------------------------------------------------------ three foreign models

class ViT(nn.Module):
  """4 "patches" of 4 pixels -> Dense embedding -> one pre-LN block with Flax's attention."""
  @nn.compact
  def __call__(self, x):
    t = nn.Dense(32, name="embed")(x.reshape(x.shape[0], 4, 4))
    h = nn.LayerNorm(name="ln1")(t)
    t = t + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=32, name="attn")(h)
    h = nn.LayerNorm(name="ln2")(t)
    t = t + nn.Dense(32, name="fc2")(nn.gelu(nn.Dense(64, name="fc1")(h)))
    return nn.Dense(CLASSES, name="head")(t.mean(1))


def linen_model():
  model = ViT()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, DIM)))["params"]
  return params, lambda p, x: model.apply({"params": p}, x)


class NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(DIM, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 32, rngs=rngs)
    self.head = nnx.Linear(32, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


def nnx_model():
  graphdef, state = nnx.split(NnxMlp(nnx.Rngs(0)))

  def apply(p, x):  # the user's functional view of an NNX module
    s = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s)(x)
  return nnx.to_pure_dict(state), apply


def plain_model():
  r = np.random.default_rng(1)
  params = {"w1": jnp.asarray(r.normal(size=(DIM, 64)) / 4, jnp.float32),
            "b1": jnp.zeros((64,)),
            "w2": jnp.asarray(r.normal(size=(64, 32)) / 8, jnp.float32),
            "out": {"w": jnp.asarray(r.normal(size=(32, CLASSES)) / 6, jnp.float32)}}

  def apply(p, x):
    h = jax.nn.relu(jnp.dot(x, p["w1"]) + p["b1"])
    h = jax.nn.relu(jnp.einsum("bi,io->bo", h, p["w2"]))  # einsum: a nested jit
    return h @ p["out"]["w"]
  return params, apply


# per model: what the 90% rule, the 2:4 subset, and the quantized kernels are
MODELS = {
    "linen": (linen_model, r".*kernel", r"(fc1|fc2)/kernel", layout.FLAX_ATTENTION),
    "nnx": (nnx_model, r".*kernel", r"fc2/kernel", None),
    "plain": (plain_model, r"w1|w2|out/w", r"w2", None),
}


# ---------------------------------------------------------------------------- the kit

def _loss_fn(logits, batch):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return ce, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


def _train(steps_obj, state, batches, frozen=None):
  fn = jax.jit(steps_obj.train_step, donate_argnums=(0,))
  losses = []
  for b in batches:
    state, m = fn(state, b, frozen)
    losses.append(float(m["loss"]))
  return state, losses


def _batches(x, y, n, bs=32, seed=0):
  r = np.random.default_rng(seed)
  for _ in range(n):
    i = r.choice(len(x), bs, replace=False)
    yield {"x": x[i], "y": y[i]}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_foreign_model_gets_the_whole_kit(name, tmp_path):
  build, kernels, subset, contract = MODELS[name]
  params, apply = build()
  fwd = lambda p, b: (apply(p, b["x"]), {})  # (outputs, intermediates)
  x, y = _task()
  tx = optax.adam(3e-3)

  dense = step.build(fwd, _loss_fn, tx)  # the teacher: the same model, dense
  teacher, _ = _train(dense, dense.init(params, jax.random.PRNGKey(0), {"x": x[:2]}),
                      _batches(x, y, 60, seed=1))

  ramp = pruning.Ramp("polynomial", begin=0, end=20, every=5)
  plan = Plan(
      rules([(subset, pruning.n_of_m(2, 4, contract=contract)),
             (kernels, pruning.unstructured(0.9, ramp=ramp))]),
      rules([(kernels, quant.weights(8, contract=contract))]),
      rules([(kernels, activations.inputs(8, "int8"))]),
      distill.method(fwd, temperature=2.0, alpha=0.5))
  steps = step.build(fwd, _loss_fn, tx, plan)
  frozen = {"distill": teacher.params}
  student = jax.tree.map(jnp.copy, teacher.params)  # its own buffers: the step donates them
  state = steps.init(student, jax.random.PRNGKey(1), {"x": x[:2]}, frozen)
  calib = [{"x": x[i:i + 32]} for i in range(0, 128, 32)]
  params, cstate = plan.calibrate(fwd, state.params, state.cstate, calib)
  state = state.replace(params=params, cstate=cstate)
  state, losses = _train(steps, state, _batches(x, y, 48, seed=2), frozen)

  assert np.mean(losses[20:23]) > np.mean(losses[-3:])  # it recovers once the ramp ends
  flat, cstate = flatten(state.params), state.cstate
  masks = {**cstate["2:4"]["masks"], **cstate["magnitude_layer_0.9"]["masks"]}
  assert set(cstate["2:4"]["masks"]) and set(cstate["magnitude_layer_0.9"]["masks"])
  for path, mask in cstate["magnitude_layer_0.9"]["masks"].items():  # realized, exact
    mask = np.asarray(mask)
    assert (~mask).sum() == round(0.9 * mask.size), path
  for path, mask in cstate["2:4"]["masks"].items():  # groups along the contraction axes
    mask = np.asarray(mask)
    axes = layout.contract_axes(contract, path, mask.ndim)
    rest = [a for a in range(mask.ndim) if a not in axes]
    rows = np.transpose(mask, list(axes) + rest).reshape(-1, 4, int(
        np.prod([mask.shape[a] for a in rest])))
    assert (rows.sum(axis=1) == 2).all(), path
  for path, mask in masks.items():  # the master weights, after Adam steps: exact zeros
    assert (np.asarray(flat[path])[~np.asarray(mask)] == 0).all(), path
  view = flatten(plan.view(state.params, cstate))
  for path in masks:  # <= 255 levels per output channel of the computed weights
    w = np.asarray(view[path])
    axes = layout.contract_axes(contract, path, w.ndim)
    outs = [a for a in range(w.ndim) if a not in axes]
    per_channel = np.moveaxis(w, outs, list(range(len(outs)))).reshape(
        int(np.prod([w.shape[a] for a in outs])), -1)
    assert max(len(np.unique(c)) for c in per_channel) <= 255, path

  # the export runs without the plan: codes + masks + activation scales -> same logits
  out = str(tmp_path / "export")
  export.export(state.params, out, plan, cstate)
  loaded = unflatten(flatten(export.load(out)), like=params)
  scales, bits, mode = export.load_activation_scales(out)
  assert sorted(scales) == sorted(cstate["act8_int8"]) and (bits, mode) == (8, "int8")
  evaluated = steps.forward(state.params, cstate, {"x": x[:64]})[0]
  served = activations.apply_quantized(lambda p, x: apply(p, x), scales, bits, mode)(
      loaded, x[:64])
  np.testing.assert_allclose(np.asarray(served), np.asarray(evaluated), rtol=1e-5, atol=1e-5)
  hlo = jax.jit(lambda p, x: activations.apply_quantized(apply, scales, bits, mode)(
      p, x)).lower(loaded, x[:64]).as_text()
  assert "xi8>" in hlo and "xi32>" in hlo  # the served model multiplies integers


# --------------------------------- docs/guides/own_model.md "Compressing your own model", run

OWN_MODEL_DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "guides",
                             "own_model.md")
MARKER = r"<!-- own-model: ([\w-]+) -->\n```python\n(.*?)```"
SNIPPETS = ("optax-loop", "baselines", "calibrate", "contract", "nnx", "artifact",
            "scan")  # scan: run by tests/test_scan_calibration.py


def run_readme(name, **env):
  """Run docs/guides/own_model.md's code block marked `<!-- own-model: name -->` with `env` (and
  jax) as its variables; -> those variables after it ran. What runs is what the doc shows."""
  with open(OWN_MODEL_DOC) as f:
    blocks = dict(re.findall(MARKER, f.read(), re.S))
  assert name in blocks, f"docs/guides/own_model.md has no python block <!-- own-model: {name} -->"
  ns = {"jax": jax, "jnp": jnp, **env}
  exec(compile(blocks[name], f"docs/guides/own_model.md <!-- own-model: {name} -->", "exec"), ns)
  return ns


def test_every_readme_snippet_is_run_here():
  with open(OWN_MODEL_DOC) as f:
    assert [n for n, _ in re.findall(MARKER, f.read(), re.S)] == list(SNIPPETS)
  # the README shows the first of them: the same block, so that it is run too
  with open(os.path.join(os.path.dirname(OWN_MODEL_DOC), os.pardir, os.pardir, "README.md")) as f:
    shown = dict(re.findall(MARKER, f.read(), re.S))
  with open(OWN_MODEL_DOC) as f:
    assert shown == {"optax-loop": dict(re.findall(MARKER, f.read(), re.S))["optax-loop"]}


def test_readme_table_of_methods_builds_each_method():
  """The first call in each row of the table of pieces in docs/guides/own_model.md builds a `Method`."""
  from mmjax.compress import Method, formats, post_training
  from mmjax.compress.post_training import gptq, rtn  # noqa: F401 (post_training.rtn...)
  with open(OWN_MODEL_DOC) as f:
    table = f.read().split("<!-- own-model-table -->\n", 1)[1].split("\n\n", 1)[0]
  calls = [re.search(r"`([^`]+\))`", row.split("|")[2]).group(1)
           for row in table.splitlines()[2:]]
  assert len(calls) == 7, table
  env = dict(pruning=pruning, quant=quant, activations=activations, formats=formats,
             post_training=post_training, grid=formats.grid("int", 4))
  for call in calls:
    assert isinstance(eval(call, env), Method), call


def test_readme_snippet_in_an_existing_optax_loop():
  """docs/guides/own_model.md: three added lines in a plain optax loop."""
  params, apply_fn = plain_model()
  x, y = _task()
  tx = optax.adam(3e-3)
  loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  ns = run_readme("optax-loop", params=params, apply_fn=apply_fn, x=x, tx=tx, loss=loss,
                  optax=optax)
  plan, params, cstate, train_step = ns["plan"], ns["params"], ns["cstate"], ns["train_step"]
  opt_state = tx.init(params)
  first = float(loss(plan.apply(apply_fn, params, cstate)(x)))
  for s in range(1, 41):
    params, opt_state, cstate = train_step(params, opt_state, cstate, s)
  assert float(loss(plan.apply(apply_fn, params, cstate)(x))) < first
  assert (np.asarray(params["w1"]) == 0).mean() == pytest.approx(0.9, abs=1 / 1024)


def _fake_quant(w, axis, bits):
  """float64 NumPy symmetric fake-quant, one scale per slice along `axis` (the reduced one)."""
  w = np.asarray(w, np.float64)
  top = 2 ** (bits - 1) - 1
  s = np.abs(w).max(axis, keepdims=True) / top
  return np.clip(np.round(w / s), -top, top) * s


def test_readme_baselines_magnitude_and_round_to_nearest():
  params, apply_fn = plain_model()
  ns = run_readme("baselines", params=params, apply_fn=apply_fn, x=_task(8)[0])
  for k in ("w1", "w2"):
    w = np.abs(np.asarray(params[k]))
    kth = np.sort(w.ravel())[w.size // 2]  # the smallest of the larger half
    np.testing.assert_array_equal(np.asarray(ns["pruned"][k]) != 0, w >= kth)
    np.testing.assert_allclose(np.asarray(ns["rounded"][k]), _fake_quant(params[k], 0, 4),
                               rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(ns["pruned"]["out"]["w"], params["out"]["w"])


def test_readme_calibrate_signature_and_activation_ranges():
  params, apply_fn = plain_model()
  x, _ = _task(128)
  ns = run_readme("calibrate", params=params, apply_fn=apply_fn, x=x)
  scales = ns["cstate"]["act8_int8"]
  xs = np.asarray(x[:64], np.float64)  # the batches: the inputs of w1, then of w2
  h = np.maximum(xs @ _fake_quant(params["w1"], 0, 8) + np.asarray(params["b1"]), 0)
  np.testing.assert_allclose(float(scales["w1"]), np.abs(xs).max() / 127, rtol=1e-6)
  np.testing.assert_allclose(float(scales["w2"]), np.abs(h).max() / 127, rtol=1e-5)
  # the logits: int8 codes of inputs and weights, their products rescaled (NumPy, float64)
  codes = lambda v, s: np.clip(np.round(v / s), -127, 127) * s
  s1, s2 = float(scales["w1"]), float(scales["w2"])
  h = np.maximum(codes(np.asarray(x, np.float64), s1) @ _fake_quant(params["w1"], 0, 8)
                 + np.asarray(params["b1"]), 0)
  h = np.maximum(codes(h, s2) @ _fake_quant(params["w2"], 0, 8), 0)
  np.testing.assert_allclose(np.asarray(ns["logits"]), h @ np.asarray(params["out"]["w"]),
                             rtol=1e-4, atol=1e-5)


def test_readme_contract_for_an_out_in_kernel():
  r = np.random.default_rng(2)
  params = {"w_t": jnp.asarray(r.normal(size=(64, DIM)), jnp.float32),  # [out, in]
            "head": jnp.asarray(r.normal(size=(64, CLASSES)), jnp.float32)}
  apply_fn = lambda p, x: jax.nn.relu(jnp.einsum("bi,oi->bo", x, p["w_t"])) @ p["head"]
  plan = run_readme("contract")["plan"]
  p, cs = plan.start(params, jax.random.PRNGKey(0))
  w, kept = np.asarray(params["w_t"]), np.asarray(p["w_t"]) != 0
  groups = lambda a: a.reshape(64, DIM // 4, 4)  # 4 consecutive inputs of one output
  assert (groups(kept).sum(-1) == 2).all()
  a, k = groups(np.abs(w)), groups(kept)
  assert (np.where(k, a, np.inf).min(-1) > np.where(k, -np.inf, a).max(-1)).all()
  view = plan.view(p, cs)
  np.testing.assert_allclose(np.asarray(view["w_t"]), _fake_quant(p["w_t"], 1, 8),
                             rtol=1e-6, atol=1e-7)  # one scale per output row
  np.testing.assert_allclose(np.asarray(view["head"]), _fake_quant(params["head"], 0, 8),
                             rtol=1e-6, atol=1e-7)
  assert plan.apply(apply_fn, p, cs)(_task(8)[0]).shape == (8, CLASSES)


def test_readme_nnx_route():
  x, _ = _task(16)
  ns = run_readme("nnx", model=NnxMlp(nnx.Rngs(0)))
  params, model = ns["params"], ns["model"]
  for k in ("fc1", "fc2", "head"):
    assert (np.asarray(params[k]["kernel"]) == 0).mean() == 0.5
  h = np.asarray(x, np.float64)
  for k in ("fc1", "fc2", "head"):  # NumPy forward from the compressed dict
    h = h @ np.asarray(params[k]["kernel"], np.float64) + np.asarray(params[k]["bias"])
    h = np.maximum(h, 0) if k != "head" else h
  np.testing.assert_allclose(np.asarray(model(x)), h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ns["plan"].apply(ns["apply_fn"], params,
                                                         ns["cstate"])(x)), h,
                             rtol=1e-5, atol=1e-5)


def test_readme_artifact_with_like(tmp_path, monkeypatch):
  """A list-of-layers model: the artifact rebuilds the list because the doc passes like=."""
  r = np.random.default_rng(3)
  params = [{"w": jnp.asarray(r.normal(size=(DIM, 64)) / 4, jnp.float32)},
            {"w": jnp.asarray(r.normal(size=(64, CLASSES)) / 8, jnp.float32)}]

  def apply_fn(layers, x):
    for i, layer in enumerate(layers):
      x = x @ layer["w"]
      x = jax.nn.relu(x) if i < len(layers) - 1 else x
    return x
  plan = Plan(rules([(r".*/w", quant.weights(8))]))
  p, cs = plan.start(params, jax.random.PRNGKey(0))
  x, _ = _task(8)
  monkeypatch.chdir(tmp_path)
  run_readme("artifact", params=p, apply_fn=apply_fn, plan=plan, cstate=cs, x=x)
  spec = importlib.util.spec_from_file_location("serve_readme", "my_artifact/serve.py")
  serve = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(serve)
  got = serve.load("my_artifact")({"x": np.asarray(x)})
  np.testing.assert_allclose(np.asarray(got), np.asarray(plan.apply(apply_fn, p, cs)(x)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, needle", [
    (lambda fwd: Plan(distill.method(fwd, features=("pooled",), feature_weight=1.0)),
     "distillation feature 'pooled': no 'pooled' among the model's intermediates"),
    (lambda fwd: Plan(rules([(r"b1", activations.inputs(8))])),
     "b1 .* is consumed by no dot_general"),
])
def test_bad_foreign_setups_fail_before_compilation(make, needle):
  params, apply = plain_model()
  fwd = lambda p, b: (apply(p, b["x"]), {})
  steps = step.build(fwd, _loss_fn, optax.adam(1e-3), make(fwd))
  x, _ = _task(8)
  with pytest.raises(ValueError, match=needle):
    state = jax.eval_shape(lambda: steps.init(params, jax.random.PRNGKey(0), {"x": x},
                                              {"distill": params}))
    jax.eval_shape(steps.train_step, state, {"x": x, "y": jnp.zeros(8, jnp.int32)},
                   {"distill": params})


def test_the_compress_package_imports_no_mmjax_model_code_nor_orbax():
  import subprocess
  import sys
  code = ("import sys; import mmjax.compress, mmjax.compress.step, mmjax.compress.pruning, "
          "mmjax.compress.structured, mmjax.compress.quant, mmjax.compress.activations, "
          "mmjax.compress.distill, mmjax.compress.report, mmjax.compress.export; "
          "bad = sorted(m for m in sys.modules if m.startswith(('mmjax.models', "
          "'mmjax.harness.checkpointing', 'mmjax.harness.train', 'orbax'))); print(bad); assert not bad")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------- "everything" rules on a CLIP-like model

class ClipLike(nn.Module):
  """What a third-party tower holds besides kernels: an embedding table, a class token
  [1, 1, d], LayerNorm scale and bias, Dense biases, and a 0-D `logit_scale` (CLIP's)."""
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(50, 8, name="embed")(tokens)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, 8))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, 8)), x], 1)
    x = nn.LayerNorm(name="ln")(x)
    x = nn.Dense(4, name="proj")(nn.gelu(nn.Dense(16, name="fc")(x)))
    logit_scale = self.param("logit_scale", lambda k: jnp.asarray(np.log(1 / 0.07), jnp.float32))
    return x[:, 0] * jnp.exp(logit_scale)


def _clip_like():
  """Its params (moved off their init values, so biases and LayerNorm are not 0 and 1) and
  a counter leaf of integers, as NNX states and hand-made trees carry."""
  model = ClipLike()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 5), jnp.int32))["params"]
  r = np.random.default_rng(7)
  params = jax.tree.map(lambda a: a + jnp.asarray(0.1 * r.normal(size=a.shape), a.dtype), params)
  tree = {"clip": params, "seen": jnp.arange(300, dtype=jnp.int32)}
  return tree, lambda p, t: model.apply({"params": p["clip"]}, t)


SKIPPED = {"clip/cls": "every channel scale one value", "clip/logit_scale": "a scalar",
           "seen": "dtype int32 is not floating point"}


def _fake_quant64(w):
  """float64 NumPy: symmetric int8, per output channel (all axes but the last) for a
  matrix, per tensor for a vector."""
  w = np.asarray(w, np.float64)
  axes = tuple(range(w.ndim - 1)) if w.ndim >= 2 else None
  s = np.maximum(np.abs(w).max(axis=axes, keepdims=w.ndim >= 2), 1e-30) / 127
  return np.round(w / s) * s, (w.size // np.size(s))


def test_an_everything_rule_takes_only_the_leaves_it_compresses(tmp_path):
  """`rules([(r".*", quant.weights(8))])` on a CLIP-like tree: the scalar, the [1, 1, d]
  class token (one value per channel scale) and the integer leaf are left exactly as they
  are, said once in a warning and in describe/report ("skipped"); every other leaf
  (embedding, kernels, biases, LayerNorm) is quantized (vectors per tensor) as a float64
  reference does; the report counts as compressed exactly what the export stores as
  codes, and the export gives back the view."""
  from mmjax.compress import report
  tree, _ = _clip_like()
  plan = Plan(rules([(r".*", quant.weights(8))]))
  with pytest.warns(UserWarning, match=r"rule '\.\*': compression method 'int8_channel' "
                    r"leaves 3 of the 10 leaves it matches as they are \(clip/cls: shape"):
    cstate = plan.init(tree, None)
  view, flat = flatten(plan.view(tree, cstate)), flatten(tree)
  info = plan.describe(tree, cstate)
  rep = {r["path"]: r for r in report.build(tree, plan, cstate)["leaves"]}
  index = export.export(tree, str(tmp_path / "export"), plan, cstate)
  loaded = flatten(export.load(str(tmp_path / "export")))
  for path, w in flat.items():
    w, v, row = np.asarray(w), np.asarray(view[path]), rep[path]
    stored_as_codes = "grid" in index[path]
    if path in SKIPPED:
      np.testing.assert_array_equal(v, w)  # bit for bit
      assert SKIPPED[path] in info[path].skipped and info[path].codes is None
      assert SKIPPED[path] in row["skipped"] and row["bits"] == 32
      assert row["compressed_bytes"] == row["dense_bytes"] and not stored_as_codes
    else:
      ref, per_scale = _fake_quant64(w)
      np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-7)
      assert isinstance(info[path].codes, storage.GridCodes) and "skipped" not in row
      assert row["bits"] == 8 and stored_as_codes
      assert row["compressed_bytes"] == w.size + 4 * (w.size // per_scale)
      assert row["compressed_bytes"] < row["dense_bytes"]
    assert (row["bits"] < 32) == stored_as_codes  # the report and the export agree
    np.testing.assert_allclose(loaded[path], v, rtol=1e-6, atol=1e-7)  # codes * scales
    if path in SKIPPED:
      np.testing.assert_array_equal(loaded[path], w)
  assert {"clip/ln/scale", "clip/fc/bias", "clip/embed/embedding"} <= {
      p for p in flat if rep[p]["bits"] == 8}


@pytest.mark.parametrize("pattern", [r"clip/(cls|logit_scale)", r"seen"])
def test_a_rule_whose_method_can_take_none_of_its_leaves_is_an_error(pattern):
  tree, _ = _clip_like()
  shapes = {p: jax.ShapeDtypeStruct(x.shape, x.dtype) for p, x in flatten(tree).items()}
  needle = (rf"rule '{re.escape(pattern)}': compression method 'int8_channel' can compress "
            r"none of the \d leaves it matches \(.*\); narrow the rule")
  with pytest.raises(ValueError, match=needle):  # at config time, from shapes
    Plan(rules([(pattern, quant.weights(8))])).check(shapes)
  with pytest.raises(ValueError, match=needle):  # or at the first stage
    Plan(rules([(pattern, quant.weights(8))])).init(tree, None)


def test_describe_returns_storage_records_and_the_export_refuses_one_it_cannot_write(tmp_path):
  """A describe returning the old untyped dict is refused with the records to use; a record
  of the user's own (a k-means codebook here) is counted by the report at its stated bytes,
  and the export refuses it by name, before writing anything."""
  import dataclasses

  from mmjax.compress import Method, report
  params, _ = plain_model()
  old = Method("says4", view=lambda flat, s: flat,
               describe=lambda flat, s: {p: {"bits": 4} for p in flat})
  with pytest.raises(ValueError, match=r"'says4': describe of w1 returned dict, which is not a "
                     r"storage record \(a dict: the protocol before storage records"):
    Plan(rules([(r"w1", old)])).describe(params, {"says4": {}})

  @dataclasses.dataclass(frozen=True)
  class Codebook:  # 16 centroids: 4-bit indices and 16 float32 values
    centroids: object
    role = "codes"
    bits = 4

    def nbytes(self, shape, kept):
      return kept * 4 / 8 + 4 * 16

  m = Method("kmeans", view=lambda flat, s: flat,
             describe=lambda flat, s: {p: Codebook(np.zeros(16)) for p in flat})
  plan = Plan(rules([(r"w1", m)]))
  cstate = plan.init(params, None)
  row = {r["path"]: r for r in report.build(params, plan, cstate)["leaves"]}["w1"]
  n = np.asarray(params["w1"]).size
  assert row["bits"] == 4 and row["compressed_bytes"] == n // 2 + 64 and row["compressed"]
  with pytest.raises(ValueError, match=r"export: w1 is described by a storage record Codebook, "
                     r"which the export cannot write"):
    export.export(params, str(tmp_path / "export"), plan, cstate)
  assert not (tmp_path / "export").exists() and not (tmp_path / "export.incomplete").exists()
