"""One-shot compression of a trained run, in one process, for experiments that try many
settings (sensitivity, allocation): the run's parameters loaded once, calibration and
validation batches drawn once, and one compiled forward of the dense model evaluates every
weight-only setting (the compressed weights are its inputs, so nothing recompiles).

The validation set is drawn from the training split (a shuffle with its own seed), so that
choosing settings never looks at the test split; `split="test"` evaluates on the test split
instead (what the harness reports). The model and the metrics are the run's own model
family and task (`mmjax.harness.family`, `mmjax.harness.task`): any model the harness trains.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np

from mmjax.compress import Plan, flatten, unflatten
from mmjax.data import pipeline
from mmjax.harness import checkpointing, family as family_lib, task as task_lib, train

VALIDATION_SEED = 10_007


class Session:
  def __init__(self, workdir: str, *, data_dir: str | None = None, calib_examples: int = 128,
               calib_seed: int = 0, val_examples: int = 512, split: str = "validation"):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise ValueError(f"{workdir} is not a run directory (no config.json); give the dense "
                       "run's workdir.")
    with open(path) as f:
      self.config = ml_collections.ConfigDict(json.load(f))
    if data_dir:
      self.config.data.data_dir = data_dir
    self.family = family_lib.from_config(self.config)
    self.task = task_lib.from_config(self.config, self.family)
    self.input_cfg = train.input_config(self.config, self.family)
    reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), read_only=True)
    step = reader.latest_step()
    if step is None:
      reader.close()
      raise ValueError(f"{workdir} holds no checkpoint; train the dense run first.")
    self.params = jax.device_get(reader.restore_local(step)["params"])
    reader.close()
    fam, task = self.family, self.task
    bs = self.input_cfg.batch_size
    train.check_calibration_size(calib_examples, self.input_cfg, prepared_only=False)
    if calib_examples % bs:
      raise ValueError(f"calibration examples={calib_examples} must be a multiple of the "
                       f"batch size {bs}.")
    it = pipeline.train_iterator(dataclasses.replace(self.input_cfg, seed=calib_seed))
    self.calibration = [train.model_inputs(next(it), fam, task)
                        for _ in range(calib_examples // bs)]
    if split == "test":
      self.val = [train.model_inputs(b, fam, task) for b in pipeline.eval_batches(self.input_cfg)]
    else:
      it = pipeline.train_iterator(dataclasses.replace(self.input_cfg, seed=VALIDATION_SEED))
      self.val = [train.model_inputs(next(it), fam, task)
                  for _ in range(max(1, val_examples // bs))]
    self.apply = lambda p, b: fam.apply(p, b)
    self._sums = jax.jit(lambda params, batch: task.eval_sums(fam.apply(params, batch)[0],
                                                              batch))
    self.dense = self.evaluate(self.params)

  def evaluate(self, params, fn=None) -> dict:
    """The task's metrics of `params` on the validation batches (dense forward, or `fn`);
    `accuracy` is the task's ranking metric (`Task.metric`)."""
    f = fn or self._sums
    m = task_lib.evaluate(self.task, jax.device_get([f(params, b) for b in self.val]))
    return dict(loss=m["loss"], accuracy=m[self.task.metric])

  def compress(self, plan: Plan):
    """-> (params, cstate): `plan` started and calibrated on the calibration batches."""
    params, cstate = jax.jit(plan.start)(self.params, jax.random.PRNGKey(0))
    return plan.calibrate(self.apply, params, cstate, self.calibration,
                          *train.calibration_context(self.family, self.task))

  def evaluate_plan(self, plan: Plan, params, cstate) -> dict:
    """With activation stages (a program of its own); weight-only plans use `view`."""
    wrapped = plan.wrap(self.apply, cstate, list(flatten(params)))
    fn = jax.jit(lambda p, b: self.task.eval_sums(wrapped(p, b)[0], b))
    return self.evaluate(jax.jit(plan.view)(params, cstate), fn)

  def view(self, plan: Plan, params, cstate):
    return jax.device_get(jax.jit(plan.view)(params, cstate))

  def with_leaves(self, leaves: dict):
    """The dense parameters with some leaves replaced."""
    return unflatten({**flatten(self.params), **leaves}, self.params)


def kernel_bytes(shape, grid) -> float:
  k = int(np.prod(shape[:-1]))
  return grid.nbytes(k, int(shape[-1])) if grid is not None else 4.0 * k * shape[-1]
