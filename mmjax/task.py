"""A task: the loss a run trains and the metrics it evaluates, provided by a module the
config names, so that the trainer and every entry point that evaluates know no task.

    config.task_module = "mmjax.tasks.classification"   # the default
    config.task = dict(...)                             # that module's arguments

A task module defines `task(args: dict, family: Family) -> Task`. Evaluation sums, so that
batches (and hosts) add up exactly: `eval_sums` returns per-batch sums (a `count` among
them, the real examples or tokens; padded examples carry `example_mask` False), the
harness adds them in float64 in batch order, and `finish` turns the totals into metrics.
Zero-shot classification, retrieval and per-token outputs fit the same three functions.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from mmjax.family import Family, _as_dict, import_attr

DEFAULT_MODULE = "mmjax.tasks.classification"


@dataclasses.dataclass(frozen=True)
class Task:
  """loss(outputs, batch) -> (scalar loss, {metric: scalar})     the training objective
  eval_sums(outputs, batch) -> {name: scalar sum}, "count" included
  finish(totals) -> {metric: float}, "loss" included             from the summed totals
  label_keys: the batch keys it reads besides the model's inputs (and `example_mask`)
  metric: the metric that ranks runs (a fraction, higher is better; shown as a percent):
  reports, sensitivity, deploy."""
  name: str
  loss: Callable
  eval_sums: Callable
  finish: Callable
  label_keys: tuple = ("label",)
  metric: str = "accuracy"


def from_config(config, family: Family) -> Task:
  """The task a config names (`config.task_module`, default classification)."""
  module = config.get("task_module") or DEFAULT_MODULE
  make = import_attr(module, "task", "config.task_module", "task", DEFAULT_MODULE)
  t = make(_as_dict(config.get("task")), family)
  if not isinstance(t, Task):
    raise ValueError(f"config.task_module={module!r}: task(args, family) returned "
                     f"{type(t).__name__}, not an mmjax.task.Task.")
  return t


def evaluate(task: Task, outputs_and_batches) -> dict:
  """Totals of `eval_sums` over (sums of) batches, added on the host in float64 in order,
  then `finish`ed; `examples` is the count."""
  totals = {}
  for sums in outputs_and_batches:
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  out = task.finish(totals)
  return dict(out, examples=totals.get("count", 0.0))
