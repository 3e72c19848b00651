"""Classification: softmax cross-entropy against `batch["label"]`, and accuracy. Outputs
`[batch, classes]`, or `[batch, tokens, classes]` for a per-token head, whose tokens are
weighted by the batch key the `token_mask` argument names (default: the family's
`output_mask`, e.g. mmjax's token modality's padding mask; none: every token counts).

    config.task = dict(token_mask=None, label_smoothing=0.0)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmjax.harness.task import Task

ARGS = {"token_mask": None, "label_smoothing": 0.0}


def sums(logits, batch, token_mask=None, label_smoothing=0.0):
  """(cross-entropy sum, correct count, count) over real examples (and, per token, real
  tokens). Sums, so that eval batches add up exactly."""
  labels = batch["label"]
  weights = batch["example_mask"].astype(jnp.float32)
  if logits.ndim == 3:
    weights = weights[:, None] * (batch[token_mask].astype(jnp.float32) if token_mask
                                  else jnp.ones(logits.shape[:2], jnp.float32))
  if label_smoothing:
    target = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    ce = optax.softmax_cross_entropy(logits, target)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return (ce * weights).sum(), (correct * weights).sum(), weights.sum()


def task(args: dict, family) -> Task:
  bad = sorted(set(args) - set(ARGS))
  if bad:
    raise ValueError(f"config.task has unknown field(s) {bad} for classification; valid: "
                     f"{sorted(ARGS)}.")
  token_mask = args.get("token_mask") or family.output_mask
  smoothing = float(args.get("label_smoothing") or 0.0)
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"config.task.label_smoothing={smoothing} must be in [0, 1).")

  def loss(logits, batch):
    ce, correct, count = sums(logits, batch, token_mask, smoothing)
    count = jnp.maximum(count, 1.0)
    return ce / count, {"accuracy": correct / count}

  def eval_sums(logits, batch):
    ce, correct, count = sums(logits, batch, token_mask, smoothing)
    return dict(count=count, loss_sum=ce, correct=correct)

  def finish(t):
    n = max(t.get("count", 0.0), 1.0)
    return dict(loss=t.get("loss_sum", 0.0) / n, accuracy=t.get("correct", 0.0) / n)

  return Task("classification", loss, eval_sums, finish)
