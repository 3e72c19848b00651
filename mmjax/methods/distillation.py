"""Knowledge distillation selectable from a config: the student's loss plus the KL of its
softened logits to a teacher's (and optionally features through learned projections); the
teacher is a trained run restored by the harness, a frozen input of the step."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mmjax.compress import distill
from mmjax.methods.registry import LOSS, Built, Settings, register, setting


@register("distill", stage=LOSS, doc="Distillation from a trained run (`teacher`: its "
          "workdir, or 'init' for config.init: self-distillation).")
@dataclasses.dataclass(frozen=True)
class Distill(Settings):
  teacher: str = setting("", "the teacher run's workdir, or 'init'")
  teacher_model: Optional[dict] = setting(None, "the teacher's model arguments (same model "
                                          "module); None: from the teacher run's config.json")
  temperature: float = setting(2.0, "softmax temperature of both logits")
  alpha: float = setting(0.5, "weight of the distillation term; the task loss gets 1 - alpha")
  features: tuple = setting((), "[(student intermediate, teacher intermediate), ...] "
                            "matched through learned projections")
  feature_weight: float = setting(0.0, "weight of the feature term")
  attention_weight: float = setting(0.0, "weight of the fusion attention-map term (KL of "
                                    "the student's cross-attention maps to the teacher's)")

  def check(self, where):
    distill.check(self.temperature, self.alpha, self.feature_weight, where,
                  self.attention_weight)

  def build(self, ctx, where):
    teacher_apply, frozen = ctx.teacher(self.teacher, self.teacher_model, where)
    method = distill.method(teacher_apply, temperature=self.temperature, alpha=self.alpha,
                            features=self.features, feature_weight=self.feature_weight,
                            where=where, attention_weight=self.attention_weight)
    return Built(method, frozen=(dataclasses.replace(frozen, name=method.name),))
