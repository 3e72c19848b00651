"""Knowledge distillation as a method: a frozen teacher's soft logits and features.

`distill.method(teacher_apply, ...)` is a `Method` with a `loss` stage. The teacher's
weights are a *frozen input* of the step (`train_step(state, batch, frozen={name:
teacher_params})`): an argument of the jitted step, never train state (no gradients, no
optimizer state, never saved with the student). Its forward runs inside the same step.

    loss = (1 - alpha) * task loss                                (the method's task_weight)
         + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + feature_weight * mean over `features` of MSE(proj(student_f), teacher_f)
         + attention_weight * mean over paired fusion layers of KL(teacher map || student map)

The attention maps (`attention_maps.py`) are the fusion's cross-attention probabilities,
recorded by module hooks on both forwards; a student with fewer fusion layers takes every
(L_t / L_s)-th of the teacher's.

Features are named entries of the models' intermediates ("pooled", or a path such as
"image/final"); token features [b, n, d] are mean-pooled over real tokens first (a `mask`
beside them in the intermediates says which), so towers with different token counts
compare. When widths differ, a learned linear projection maps the student's feature to the
teacher's width: trainable parameters (`init_params`), trained by the run's optimizer with
the student and checkpointed with it. Example weights come from `batch["example_mask"]`
when the batch has one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.compress import attention_maps
from mmjax.compress import hooks as hooks_lib
from mmjax.compress.core import Forward, Method


def feature(inter, name, what="distillation feature"):
  """A named feature from a model's intermediates, token features pooled to [b, d]."""
  x, parent = inter, inter
  for part in name.split("/"):
    if not isinstance(x, dict) or part not in x:
      have = sorted(x) if isinstance(x, dict) else type(x).__name__
      raise ValueError(f"{what} {name!r}: no {part!r} among the model's intermediates (have "
                       f"{have}); the apply_fn must return (outputs, intermediates) with it, "
                       "e.g. 'pooled' or '<modality>/final' for mmjax models.")
    parent, x = x, x[part]
  if x.ndim == 3:  # tokens: pool over the real ones
    mask = parent.get("mask") if isinstance(parent, dict) else None
    w = (jnp.ones(x.shape[:2], x.dtype) if mask is None else mask.astype(x.dtype))[..., None]
    x = (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
  return x


def example_weights(batch, n):
  if isinstance(batch, dict) and "example_mask" in batch:
    return batch["example_mask"].astype(jnp.float32)
  return jnp.ones((n,), jnp.float32)


def kl_soft(student_logits, teacher_logits, temperature, weights):
  """T^2 * KL(teacher_T || student_T), averaged over weighted examples."""
  t = temperature
  pt = jax.nn.softmax(teacher_logits / t, -1)
  kl = jnp.sum(pt * (jax.nn.log_softmax(teacher_logits / t, -1)
                     - jax.nn.log_softmax(student_logits / t, -1)), -1)
  return t * t * jnp.sum(kl * weights) / jnp.maximum(weights.sum(), 1.0)


def check(temperature, alpha, feature_weight, where="distillation", attention_weight=0.0):
  if not temperature > 0:
    raise ValueError(f"{where}.temperature={temperature} must be > 0.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"{where}.alpha={alpha} must be in [0, 1].")
  if feature_weight < 0:
    raise ValueError(f"{where}.feature_weight={feature_weight} must be >= 0.")
  if attention_weight < 0:
    raise ValueError(f"{where}.attention_weight={attention_weight} must be >= 0.")


def method(teacher_apply, *, temperature: float = 2.0, alpha: float = 0.5,
           features: tuple = (), feature_weight: float = 0.0, name: str = "distill",
           where: str = "distillation", attention_weight: float = 0.0) -> Method:
  """`teacher_apply(teacher_params, batch) -> (logits, intermediates)`; the teacher's
  params arrive as this method's frozen input."""
  temperature, alpha, feature_weight = float(temperature), float(alpha), float(feature_weight)
  attention_weight = float(attention_weight)
  check(temperature, alpha, feature_weight, where, attention_weight)
  features = tuple(features)
  use_features = bool(features) and feature_weight > 0
  map_hooks = attention_maps.record_hooks() if attention_weight > 0 else ()
  if map_hooks:  # the teacher's forward records its maps too
    teacher_apply = hooks_lib.apply(teacher_apply, [
        (p, hooks_lib.Around(lambda call, fn=h.fn: fn(call, {})), name) for p, h in map_hooks])

  def teacher(fwd: Forward):
    if fwd.frozen is None:
      raise ValueError(f"distillation method {name!r} has no teacher: pass its params as "
                       f"frozen={{{name!r}: teacher_params}} to the step.")
    logits, inter = teacher_apply(fwd.frozen, fwd.batch)
    feats = {f: feature(inter, f) for f in features}
    if map_hooks:
      feats["attention_maps"] = {"fusion": {
          "attention_maps": attention_maps.maps_of(inter, "teacher")}}
    return jax.lax.stop_gradient((logits, feats))

  def init_params(fwd: Forward, rng):
    """Projections (only where widths differ), lecun-normal, zero bias."""
    _, t_feats = teacher(fwd)
    proj = {}
    for i, f in enumerate(features):
      ds = feature(fwd.intermediates, f).shape[-1]
      dt = t_feats[f].shape[-1]
      if ds != dt:
        k = jax.nn.initializers.lecun_normal()(jax.random.fold_in(rng, i), (ds, dt))
        proj[f.replace("/", ".")] = {"kernel": k, "bias": jnp.zeros((dt,))}
    return proj

  def loss(fwd: Forward, state):
    t_logits, t_feats = teacher(fwd)
    w = example_weights(fwd.batch, fwd.outputs.shape[0])
    kd = kl_soft(fwd.outputs, t_logits, temperature, w)
    total = alpha * kd
    metrics = {"distill_kl": kd}
    if use_features:
      errs = []
      for f in features:
        s = feature(fwd.intermediates, f)
        p = (fwd.params or {}).get(f.replace("/", "."))
        if p is not None:
          s = s @ p["kernel"] + p["bias"]
        err = jnp.mean((s - t_feats[f]) ** 2, -1)
        errs.append(jnp.sum(err * w) / jnp.maximum(w.sum(), 1.0))
      feat = sum(errs) / len(errs)
      total = total + feature_weight * feat
      metrics["distill_feature_mse"] = feat
    if map_hooks:
      att = attention_maps.loss(fwd.intermediates, t_feats["attention_maps"], w)
      total = total + attention_weight * att
      metrics["distill_attention_kl"] = att
    return total, metrics

  return Method(name, loss=loss, init_params=init_params if features else None,
                task_weight=1.0 - alpha, hooks=map_hooks or None)
