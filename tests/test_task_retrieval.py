"""Retrieval (mmjax/tasks/retrieval.py): CLIP's and SigLIP's losses against float64 NumPy,
recall@k over the whole split (per-example outputs collected across batches, padding
dropped) against NumPy, and a two-tower model outside the package
(tests/toy_two_towers.py) trained and evaluated by the harness with it."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.common import base_config
from mmjax.data import pipeline
from mmjax.harness import checkpointing, family, task as task_lib, train
from mmjax.tasks import retrieval


def _task(**args):
  return retrieval.task(args, None)


def _norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax_ref(a, b, real, matches, scale):
  a, b = _norm(a[real]), _norm(b[real])
  m = matches[np.ix_(real, real)].astype(np.float64)
  logits = scale * a @ b.T

  def ce(lg, tg):
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return -(tg / tg.sum(-1, keepdims=True) * logp).sum(-1).mean()
  return 0.5 * (ce(logits, m) + ce(logits.T, m.T))


def _sigmoid_ref(a, b, real, matches, scale, bias):
  a, b = _norm(a[real]), _norm(b[real])
  z = scale * a @ b.T + bias
  y = np.where(matches[np.ix_(real, real)], 1.0, -1.0)
  return np.log1p(np.exp(-y * z)).sum() / real.sum()


@pytest.mark.parametrize("match_key", [None, "pair"])
def test_contrastive_losses_equal_float64_numpy(match_key):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
  real = np.array([1, 1, 1, 1, 1, 0, 0], bool)
  ids = np.array([0, 1, 1, 2, 3, 9, 9], np.int32)  # examples 1 and 2: one image, two captions
  matches = ids[:, None] == ids[None, :] if match_key else np.eye(7, dtype=bool)
  batch = {"example_mask": real, "pair": ids}
  out = {"image": jnp.float32(a), "text": jnp.float32(b)}
  got, _ = _task(match_key=match_key).loss(out, batch)
  assert float(got) == pytest.approx(_softmax_ref(a, b, real, matches, 1 / 0.07), rel=1e-5)
  siglip = dict(out, logit_scale=jnp.float32(np.log(10.0)), logit_bias=jnp.float32(-2.0))
  got, _ = _task(match_key=match_key, loss="sigmoid").loss(siglip, batch)
  assert float(got) == pytest.approx(_sigmoid_ref(a, b, real, matches, 10.0, -2.0), rel=1e-5)
  with pytest.raises(ValueError, match=r"retrieval needs the model to output a dict with "
                     r"'image' and 'text' embeddings \(got ndarray\)"):
    _task().loss(np.zeros((2, 3)), batch)
  with pytest.raises(ValueError, match=r"config.task.loss='cosine' is unknown; valid: "
                     "softmax, sigmoid"):
    _task(loss="cosine")


def _recall_ref(a, b, matches, k):
  sim = _norm(a) @ _norm(b).T
  return np.mean([matches[i, np.argsort(-sim[i])[:k]].any() for i in range(len(a))])


def test_recall_ranks_every_example_of_the_split_not_only_its_batch():
  rng = np.random.default_rng(1)
  n, bs = 22, 8  # three batches, the last with 2 padded rows
  a = rng.normal(size=(n, 6))
  b = a + rng.normal(scale=1.2, size=(n, 6))  # noisy pairs: recall well below 1
  ids = rng.integers(0, 15, n)  # repeated ids: several matches per query
  t = _task(match_key="pair", ks=(1, 3))
  sums = []
  for s in range(0, 24, bs):
    pad = max(0, s + bs - n)
    take = lambda x: np.concatenate([x[s:s + bs], np.zeros((pad,) + x.shape[1:], x.dtype)])
    batch = {"example_mask": np.arange(s, s + bs) < n, "pair": take(ids)}
    sums.append(jax.device_get(t.eval_sums({"image": jnp.float32(take(a)),
                                            "text": jnp.float32(take(b))}, batch)))
  m = task_lib.evaluate(t, sums)
  matches = ids[:, None] == ids[None, :]
  assert m["examples"] == n
  for k in (1, 3):
    assert m[f"image_to_text_recall@{k}"] == pytest.approx(_recall_ref(a, b, matches, k))
    assert m[f"text_to_image_recall@{k}"] == pytest.approx(_recall_ref(b, a, matches.T, k))
  assert m["recall@1"] == pytest.approx(0.5 * (_recall_ref(a, b, matches, 1)
                                               + _recall_ref(b, a, matches.T, 1)))
  assert 0.1 < m["recall@1"] < 0.9


def test_a_two_tower_model_trains_and_is_ranked_by_retrieval_in_the_harness(procedural_dir,
                                                                            tmp_path):
  import sys
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  c = base_config(tiny=True, modalities=("image", "text"))
  c.model_module, c.model = "toy_two_towers", dict(width=32, dim=16)
  c.task_module, c.task = "mmjax.tasks.retrieval", dict(ks=(1, 5))
  c.data.data_dir, c.mesh.data = procedural_dir, 1
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = 8, 8, 8
  out = train.train_and_evaluate(c, str(tmp_path / "run"), log=lambda *_: None)
  summary = json.load(open(tmp_path / "run" / "summary.json"))
  assert summary["eval_recall@1"] == out["eval_recall@1"]

  # the harness's figures again, from the checkpoint: every test example against every other
  fam = family.from_config(c)
  params = checkpointing.restore_params_from(str(tmp_path / "run"), fam.abstract_params())
  a, b = [], []
  for batch in pipeline.eval_batches(train.input_config(c, fam)):
    keep = np.asarray(batch["example_mask"], bool)
    o = jax.jit(fam.apply)(params, {k: batch[k] for k in ("image", "text", "text_mask")})[0]
    a.append(np.asarray(o["image"], np.float64)[keep])
    b.append(np.asarray(o["text"], np.float64)[keep])
  a, b = np.concatenate(a), np.concatenate(b)
  eye = np.eye(len(a), dtype=bool)
  assert summary["eval_examples"] == len(a) > 8
  for k in (1, 5):
    assert summary[f"eval_image_to_text_recall@{k}"] == pytest.approx(
        _recall_ref(a, b, eye, k), abs=1e-9)
    assert summary[f"eval_text_to_image_recall@{k}"] == pytest.approx(
        _recall_ref(b, a, eye, k), abs=1e-9)
