"""Optimizer and learning-rate schedule from the experiment config, through optax.

`config.optimizer`: name (any optax optimizer, e.g. adamw, adam, sgd, lion), lr, schedule
(warmup_cosine | warmup_linear | constant), warmup_steps, end_lr_factor, clip_norm (global
norm clipping; 0 turns it off), trainable (a regex over parameter paths: only those that
match are updated, e.g. "head/.*" for a linear probe of a pretrained encoder; the rest
get no update and no optimizer state; "none": no model parameter, only the compression
methods' own trainables, as LoRA adapters on a frozen quantized base), and the optimizer's own arguments (b1, b2, eps,
weight_decay, momentum, ...): those the chosen optimizer does not take are an error.
"""
from __future__ import annotations

import inspect
import re

import jax
import optax

SCHEDULES = ("warmup_cosine", "warmup_linear", "constant")
_GENERIC = {"name", "lr", "schedule", "warmup_steps", "end_lr_factor", "clip_norm",
            "trainable"}


def make_lr_schedule(opt_cfg, total_steps: int):
  lr, warmup = float(opt_cfg.lr), int(opt_cfg.get("warmup_steps", 0))
  kind = opt_cfg.get("schedule", "warmup_cosine")
  end = lr * float(opt_cfg.get("end_lr_factor", 0.0))
  if kind == "constant":
    return optax.constant_schedule(lr)
  warmup = min(warmup, max(total_steps - 1, 0))
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                              end_value=end)
  if kind == "warmup_linear":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.linear_schedule(lr, end, max(total_steps - warmup, 1))],
                                [warmup])
  raise ValueError(f"config.optimizer.schedule={kind!r} is unknown; valid: {SCHEDULES}.")


def validate(opt_cfg, total_steps: int):
  """Errors for a bad optimizer config, before anything is compiled."""
  name = opt_cfg.get("name", "adamw")
  factory = getattr(optax, name, None)
  if factory is None or not callable(factory) or name.startswith("_"):
    raise ValueError(f"config.optimizer.name={name!r} is not an optax optimizer; e.g. adamw, "
                     "adam, sgd, lion, lamb, adafactor.")
  if not float(opt_cfg.lr) > 0:
    raise ValueError(f"config.optimizer.lr={opt_cfg.lr} must be > 0.")
  if opt_cfg.get("schedule", "warmup_cosine") not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={opt_cfg.schedule!r} is unknown; valid: "
                     f"{SCHEDULES}.")
  if int(opt_cfg.get("warmup_steps", 0)) < 0:
    raise ValueError(f"config.optimizer.warmup_steps={opt_cfg.warmup_steps} must be >= 0.")
  if float(opt_cfg.get("clip_norm", 0.0)) < 0:
    raise ValueError(f"config.optimizer.clip_norm={opt_cfg.clip_norm} must be >= 0.")
  params = inspect.signature(factory).parameters
  extra = {k: v for k, v in opt_cfg.items() if k not in _GENERIC}
  unknown = sorted(k for k in extra if k not in params)
  if unknown:
    raise ValueError(f"config.optimizer has {unknown}, which optax.{name} does not take; it "
                     f"takes {sorted(p for p in params if p != 'learning_rate')}.")
  return factory, extra


NONE = "none"  # config.optimizer.trainable: no model parameter, only compression trainables


def check_trainable(opt_cfg, paths) -> None:
  """config.optimizer.trainable must compile and match at least one parameter path."""
  pattern = opt_cfg.get("trainable")
  if not pattern or pattern == NONE:
    return
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"config.optimizer.trainable={pattern!r} is not a regex ({e}).") from None
  if not any(rx.fullmatch(p) for p in paths):
    raise ValueError(f"config.optimizer.trainable={pattern!r} matches no parameter; paths look "
                     f"like {sorted(paths)[:4]}.")


def _trainable(tx, pattern):
  """`tx` on the parameters `pattern` matches; the others frozen (no update, no state).
  The step optimizes (params, aux): a compression method's own trainables (aux) always
  train."""
  from mmjax.compress import paths as paths_lib
  rx = re.compile("(?!)" if pattern == NONE else pattern)

  def of_params(params):
    flat = paths_lib.flatten(params)
    return paths_lib.unflatten({p: "train" if rx.fullmatch(p) else "frozen" for p in flat},
                               like=params)

  def labels(tree):
    if isinstance(tree, tuple) and len(tree) == 2:
      return (of_params(tree[0]), jax.tree_util.tree_map(lambda _: "train", tree[1]))
    return of_params(tree)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def make_optimizer(opt_cfg, total_steps: int):
  """-> (optax transformation, learning-rate schedule)."""
  factory, extra = validate(opt_cfg, total_steps)
  lr_schedule = make_lr_schedule(opt_cfg, total_steps)
  tx = factory(learning_rate=lr_schedule, **extra)
  clip = float(opt_cfg.get("clip_norm", 0.0))
  # Always a chain, so the optimizer state's structure (and a checkpoint) does not depend
  # on whether clipping is on.
  tx = optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(), tx)
  if opt_cfg.get("trainable"):
    tx = _trainable(tx, opt_cfg.get("trainable"))
  return tx, lr_schedule
