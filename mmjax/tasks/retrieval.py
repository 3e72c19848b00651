"""Retrieval between two towers (CLIP, SigLIP): the model outputs a dict with one embedding
per tower, `[batch, dim]` each; training contrasts the batch's pairs, evaluation ranks
every example of the split against every other (not only within a batch).

    config.task_module = "mmjax.tasks.retrieval"
    config.task = dict(outputs=("image", "text"), loss="softmax", temperature=0.07,
                       ks=(1, 5), match_key=None)

Loss: "softmax" is CLIP's symmetric InfoNCE, "sigmoid" SigLIP's pairwise sigmoid loss.
The scale is the model's own when it outputs `logit_scale` (CLIP's convention: the log of
the multiplier; SigLIP also outputs `logit_bias`), else 1/temperature. `match_key` names a
batch key whose equal values mark matching pairs (five captions of one image); without
it, example i of one tower matches example i of the other.

Evaluation collects each real example's normalized embeddings (`eval_sums` returns them
as per-example arrays, which `mmjax.harness.task.evaluate` concatenates in order) and `finish`
ranks the whole split: recall@k in both directions, and `recall@1` (their mean) as the
metric that ranks runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.harness.task import Task

ARGS = {"outputs": ("image", "text"), "loss": "softmax", "temperature": 0.07, "ks": (1, 5),
        "match_key": None}
LOSSES = ("softmax", "sigmoid")


def _normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _scale_bias(outputs, temperature):
  scale = (jnp.exp(outputs["logit_scale"].astype(jnp.float32)) if "logit_scale" in outputs
           else jnp.float32(1.0 / temperature))
  return scale, outputs.get("logit_bias", jnp.float32(0.0)).astype(jnp.float32)


def _matches(batch, match_key, n):
  if match_key is None:
    return jnp.eye(n, dtype=bool)
  ids = batch[match_key]
  return ids[:, None] == ids[None, :]


def contrastive_loss(a, b, real, matches, scale, bias, kind):
  """The mean loss over the batch's real examples (padded ones are neither queries nor
  candidates). softmax: each query's cross-entropy against its matches (spread evenly
  over several), both directions averaged; sigmoid: every real pair a binary label."""
  logits = scale * (_normalize(a) @ _normalize(b).T) + bias
  pair = real[:, None] & real[None, :]
  n = jnp.maximum(real.sum(), 1)
  if kind == "sigmoid":
    labels = jnp.where(matches, 1.0, -1.0)
    return -jnp.sum(jnp.where(pair, jax.nn.log_sigmoid(labels * logits), 0.0)) / n
  target = jnp.where(matches & pair, 1.0, 0.0)
  target = target / jnp.maximum(target.sum(-1, keepdims=True), 1.0)
  masked = jnp.where(pair, logits, -1e9)

  def one_way(lg, tg):
    ce = -jnp.sum(tg * jax.nn.log_softmax(lg, axis=-1), axis=-1)
    return jnp.sum(jnp.where(real, ce, 0.0)) / n
  return 0.5 * (one_way(masked, target) + one_way(masked.T, target.T))


def recall_at(sim, matches, k):
  """Fraction of queries (rows) with a match among their k most similar candidates."""
  k = min(k, sim.shape[1])
  top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.take_along_axis(matches, top, axis=1).any(axis=1)))


def task(args: dict, family) -> Task:
  bad = sorted(set(args) - set(ARGS))
  if bad:
    raise ValueError(f"config.task has unknown field(s) {bad} for retrieval; valid: "
                     f"{sorted(ARGS)}.")
  a_name, b_name = tuple(args.get("outputs") or ARGS["outputs"])
  kind = args.get("loss") or "softmax"
  if kind not in LOSSES:
    raise ValueError(f"config.task.loss={kind!r} is unknown; valid: {', '.join(LOSSES)}.")
  temperature = float(args.get("temperature") or ARGS["temperature"])
  if not temperature > 0:
    raise ValueError(f"config.task.temperature={temperature} must be > 0.")
  ks = tuple(int(k) for k in (args.get("ks") or ARGS["ks"]))
  match_key = args.get("match_key")

  def towers(outputs):
    if not isinstance(outputs, dict) or a_name not in outputs or b_name not in outputs:
      got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
      raise ValueError(f"retrieval needs the model to output a dict with {a_name!r} and "
                       f"{b_name!r} embeddings (got {got}); set config.task.outputs.")
    return outputs[a_name], outputs[b_name]

  def loss(outputs, batch):
    a, b = towers(outputs)
    real = batch["example_mask"].astype(bool)
    scale, bias = _scale_bias(outputs, temperature)
    matches = _matches(batch, match_key, a.shape[0])
    value = contrastive_loss(a, b, real, matches, scale, bias, kind)
    # within the batch only (the eval metric ranks the whole split)
    sim = jnp.where(real[None, :], _normalize(a) @ _normalize(b).T, -jnp.inf)
    hit = jnp.take_along_axis(matches, jnp.argmax(sim, -1)[:, None], axis=1)[:, 0]
    return value, {"batch_recall@1": jnp.sum(hit & real) / jnp.maximum(real.sum(), 1)}

  def eval_sums(outputs, batch):
    a, b = towers(outputs)
    real = batch["example_mask"].astype(jnp.float32)
    ids = batch[match_key] if match_key else jnp.zeros(a.shape[:1], jnp.int32)
    return dict(count=real.sum(), real=real, a=_normalize(a), b=_normalize(b), ids=ids)

  def finish(t):
    keep = np.asarray(t["real"]) > 0
    a, b = np.asarray(t["a"])[keep], np.asarray(t["b"])[keep]
    if match_key:
      ids = np.asarray(t["ids"])[keep]
      matches = ids[:, None] == ids[None, :]
    else:
      matches = np.eye(len(a), dtype=bool)
    sim = a.astype(np.float64) @ b.astype(np.float64).T
    out = {}
    for k in ks:
      out[f"{a_name}_to_{b_name}_recall@{k}"] = recall_at(sim, matches, k)
      out[f"{b_name}_to_{a_name}_recall@{k}"] = recall_at(sim.T, matches.T, k)
    first = ks[0]
    out[f"recall@{first}"] = 0.5 * (out[f"{a_name}_to_{b_name}_recall@{first}"]
                                    + out[f"{b_name}_to_{a_name}_recall@{first}"])
    return out

  return Task("retrieval", loss, eval_sums, finish, label_keys=(match_key,) if match_key
              else (), metric=f"recall@{ks[0]}")
