"""Knowledge distillation targets: a frozen teacher's soft logits and features.

The teacher is a parameter tree restored from an earlier run's checkpoint (its own model
config read from that run's config.json, so it may be larger than the student). It is an
argument of the jitted train step, never part of the train state: no gradients, no
optimizer state, never saved with the student. Its forward pass runs inside the same step.

    loss = (1 - alpha) * CE(student, labels)
         + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + feature_weight * mean over `features` of MSE(proj(student_f), teacher_f)

Features are named entries of the models' intermediates ("pooled", or a path such as
"image/final"); token features are mean-pooled over real tokens first so that towers with
different token counts compare. When widths differ, a learned linear projection maps the
student's feature to the teacher's width; its weights and Adam state live in the
compression state (they are trained with the student, and checkpointed with it).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

FEATURE_LR = 1e-3


def feature(inter, name):
  """A named feature from a model's intermediates, token features pooled to [b, d]."""
  x = inter
  for part in name.split("/"):
    if not isinstance(x, dict) or part not in x:
      have = sorted(x) if isinstance(x, dict) else type(x).__name__
      raise ValueError(f"distillation feature {name!r}: no {part!r} among the model's "
                       f"intermediates (have {have}); use 'pooled' or '<modality>/final'.")
    x = x[part]
  if x.ndim == 3:  # tokens: pool over the real ones of that tower
    tower = inter[name.split("/")[0]]
    w = tower["mask"].astype(x.dtype)[..., None]
    x = (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
  return x


def kl_soft(student_logits, teacher_logits, temperature, weights):
  """T^2 * KL(teacher_T || student_T), averaged over weighted examples."""
  t = temperature
  pt = jax.nn.softmax(teacher_logits / t, -1)
  kl = jnp.sum(pt * (jax.nn.log_softmax(teacher_logits / t, -1)
                     - jax.nn.log_softmax(student_logits / t, -1)), -1)
  return t * t * jnp.sum(kl * weights) / jnp.maximum(weights.sum(), 1.0)


@dataclasses.dataclass(frozen=True)
class Distill:
  teacher_model: nn.Module
  temperature: float = 2.0
  alpha: float = 0.5
  features: tuple = ()
  feature_weight: float = 0.0

  def validate(self):
    if not self.temperature > 0:
      raise ValueError(f"config.compress.distill.temperature={self.temperature} must be > 0.")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"config.compress.distill.alpha={self.alpha} must be in [0, 1].")
    if self.feature_weight < 0:
      raise ValueError(f"config.compress.distill.feature_weight={self.feature_weight} "
                       "must be >= 0.")
    return self

  def teacher_outputs(self, teacher_params, batch):
    logits, inter = self.teacher_model.apply({"params": teacher_params}, batch)
    feats = {f: feature(inter, f) for f in self.features}
    return jax.lax.stop_gradient((logits, feats))

  def init_aux(self, student_feats: dict, teacher_feats: dict, rng):
    """Projections (only where widths differ) and their Adam state."""
    proj = {}
    for i, f in enumerate(self.features):
      ds, dt = student_feats[f].shape[-1], teacher_feats[f].shape[-1]
      if ds != dt:
        proj[f.replace("/", ".")] = {
            "kernel": nn.initializers.lecun_normal()(jax.random.fold_in(rng, i), (ds, dt)),
            "bias": jnp.zeros((dt,))}
    return {"proj": proj, "opt": optax.adam(FEATURE_LR).init(proj)}

  def loss(self, logits, inter, ce, teacher, aux, batch):
    """-> (total loss, metrics). `ce` is the student's hard-label loss."""
    t_logits, t_feats = teacher
    w = batch["example_mask"].astype(jnp.float32)
    kd = kl_soft(logits, t_logits, self.temperature, w)
    total = (1.0 - self.alpha) * ce + self.alpha * kd
    metrics = {"distill_kl": kd}
    if self.features and self.feature_weight > 0:
      errs = []
      for f in self.features:
        s = feature(inter, f)
        p = aux["proj"].get(f.replace("/", "."))
        if p is not None:
          s = s @ p["kernel"] + p["bias"]
        err = jnp.mean((s - t_feats[f]) ** 2, -1)
        errs.append(jnp.sum(err * w) / jnp.maximum(w.sum(), 1.0))
      feat = sum(errs) / len(errs)
      total = total + self.feature_weight * feat
      metrics["distill_feature_mse"] = feat
    return total, metrics

  def update_aux(self, aux, grads):
    updates, opt = optax.adam(FEATURE_LR).update(grads, aux["opt"], aux["proj"])
    return {"proj": optax.apply_updates(aux["proj"], updates), "opt": opt}
