"""Knowledge distillation: a student about half the dense baseline's size learns from the
trained dense model's soft logits (T=2, alpha=0.5) and pooled features; `scratch` trains
the same student on hard labels alone, the comparison that says what distillation buys.

The student is `small` with one block per tower and one fusion layer (1.28M vs 2.50M
parameters). The teacher's model config is read from its run's config.json.
`attention=<weight>` adds the fusion attention-map term (the student's one fusion layer
learns the teacher's last: mmjax/compress/attention_maps.py); `alpha=<weight>` sets the
logit term's. With `attention` and alpha=0 the attention maps are the only distillation
term (no logits, no pooled features): the task loss plus the maps' KL.

Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/distill.py --workdir=workdirs/distill
  ./launch.sh train --config=experiments/configs/distill.py:scratch --workdir=workdirs/student
  ./launch.sh train --config=experiments/configs/distill.py:attention=1 --workdir=workdirs/distill_att
"""
from experiments.configs.common import DENSE_WORKDIR, base_config, distill, parse_arg


def student_model(c, tiny: bool):
  for tower in c.model.towers.values():
    tower["num_layers"] = 1
  c.model.fusion["num_layers"] = 1
  if tiny:
    c.model.d_model, c.model.num_heads, c.model.mlp_dim = 16, 2, 32


def get_config(arg=None):
  args = parse_arg(arg, valid=("tiny", "scratch"), values={"attention": float, "alpha": float})
  tiny = bool(args.get("tiny"))
  c = base_config(tiny=tiny)
  student_model(c, tiny)
  if not args.get("scratch"):
    alone = "attention" in args and args.get("alpha", 0.5) == 0
    c.compress.distill = distill(teacher=DENSE_WORKDIR, temperature=2.0,
                                 alpha=args.get("alpha", 0.5),
                                 features=() if alone else ("pooled",),
                                 feature_weight=0.0 if alone else 1.0,
                                 attention_weight=args.get("attention", 0.0))
    c.compress.export = True
  return c
