"""A task: the loss a run trains and the metrics it evaluates, provided by a module the
config names, so that the trainer and every entry point that evaluates know no task.

    config.task_module = "mmjax.tasks.classification"   # the default
    config.task = dict(...)                             # that module's arguments

A task module defines `task(args: dict, family: Family) -> Task`. Evaluation sums, so that
batches (and hosts) add up exactly: `eval_sums` returns per-batch sums (a `count` among
them, the real examples or tokens; padded examples carry `example_mask` False), the
harness adds them in float64 in batch order, and `finish` turns the totals into metrics.
A metric over the whole split that sums cannot give (retrieval ranks every example against
every other) returns per-example arrays `[batch, ...]` beside its sums: those are
concatenated in batch order (padded rows included: the task drops them by its own
`example_mask` column) and reach `finish` as arrays. Per-token outputs are sums over a
token mask (`tasks/classification`), zero-shot classification is classification over the
model's image-to-prompt logits, and retrieval is `tasks/retrieval`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from mmjax.harness.family import Family, _as_dict, import_attr

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
                     f"{type(t).__name__}, not an mmjax.harness.task.Task.")
  return t


def evaluate(task: Task, outputs_and_batches) -> dict:
  """Totals of `eval_sums` over batches: scalars added on the host in float64 in order,
  per-example arrays concatenated in order; then `finish`ed. `examples` is the count."""
  totals, rows = {}, {}
  for sums in outputs_and_batches:
    for k, v in sums.items():
      v = np.asarray(v)
      if v.ndim == 0:
        totals[k] = totals.get(k, 0.0) + float(v)
      else:
        rows.setdefault(k, []).append(v)
  totals.update({k: np.concatenate(v) for k, v in rows.items()})
  out = task.finish(totals)
  return dict(out, examples=float(totals.get("count", 0.0)))
