"""A task module written outside mmjax (`config.task_module="toy_task"`): classification
trained with label smoothing and ranked by top-k accuracy (`config.task.k`)."""
import jax.numpy as jnp
import optax

from mmjax.harness.task import Task


def task(args: dict, family) -> Task:
  k, smoothing = int(args.get("k", 3)), float(args.get("smoothing", 0.1))
  if not 1 <= k:
    raise ValueError(f"config.task.k={k} must be >= 1.")

  def sums(logits, batch):
    w = batch["example_mask"].astype(jnp.float32)
    target = optax.smooth_labels((batch["label"][:, None] == jnp.arange(logits.shape[-1])
                                  ).astype(jnp.float32), smoothing)
    ce = optax.softmax_cross_entropy(logits, target)
    rank = (logits > jnp.take_along_axis(logits, batch["label"][:, None], -1)).sum(-1)
    return (ce * w).sum(), ((rank < k) * w).sum(), w.sum()

  def loss(logits, batch):
    ce, hits, n = sums(logits, batch)
    n = jnp.maximum(n, 1.0)
    return ce / n, {f"top{k}": hits / n}

  def eval_sums(logits, batch):
    ce, hits, n = sums(logits, batch)
    return dict(count=n, loss_sum=ce, hits=hits)

  def finish(t):
    n = max(t["count"], 1.0)
    return {"loss": t["loss_sum"] / n, f"top{k}": t["hits"] / n}

  return Task("toy_topk", loss, eval_sums, finish, label_keys=("label",), metric=f"top{k}")
