"""The trainer: every experiment runs `train_and_evaluate(config, workdir)`.

Reads top to bottom: the task (the steps of the config's model family under its task) ->
setup (everything validated from the config before anything is compiled or written) ->
state (resume rules) -> the loop (train, log, evaluate, checkpoint) -> the run (summary,
compression outputs). The model and the task come from the modules the config names
(`mmjax.harness.family`, `mmjax.harness.task`); the step is `mmjax.compress.step`. This file names no
model, no task and no compression method.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from mmjax.compress import Forward, flatten
from mmjax.compress import step as step_lib
from mmjax.data import pipeline, sources
from mmjax.harness import checkpointing, compress_finish, forward_cost, optim, sharding
from mmjax.harness import task as task_lib
from mmjax.harness.family import Family
from mmjax.harness.metrics_writer import MetricsWriter, Progress
from mmjax.harness.run_setup import (  # noqa: F401 (the trainer's API re-exported)
    Setup, check_calibration_size, check_workdir, init_params, input_config, is_run,
    model_inputs, validate)
from mmjax.harness.task import Task

TrainState = step_lib.TrainState


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stops and the last good checkpoint stays."""


# ============================================================================ the task

def make_steps(fam: Family, task: Task, tx, lr_schedule=None, plan=None) -> step_lib.Steps:
  """The compressed train and eval steps of a model family under a task."""
  return step_lib.build(fam.apply, task.loss, tx, plan, eval_fn=task.eval_sums,
                        lr_schedule=lr_schedule, apply_rng=True)


def evaluate(eval_step, params, cstate, setup, batch_sharding, aux=None):
  """Every example of the eval split exactly once; -> the task's metrics. `aux`: the
  train state's, holding the trainable entries split out of `cstate` (if any)."""
  # dispatched batch after batch and read once at the end: no host stall per batch
  outs = [eval_step(params, cstate, sharding.global_batch(
      model_inputs(local, setup.family, setup.task), batch_sharding), aux)
          for local in pipeline.eval_batches(setup.input_cfg)]
  return task_lib.evaluate(setup.task, [jax.tree.map(sharding.to_host, o) for o in outs])


# ============================================================================ calibration

def calibration_context(fam, task):
  """-> (loss, row_groups) for `Plan.calibrate`: the task's loss on the model's outputs,
  and the family's modality of each token, for the methods that weigh calibration tokens
  by sensitivity."""
  return (lambda outputs, batch: task.loss(outputs[0], batch)[0]), fam.row_groups


def _calibrate(comp, state, state_shd, setup, log):
  """The plan's calibration stages on a few training batches, read by a separate iterator
  (the training order is untouched), through the compressed weights."""
  t0 = time.perf_counter()
  examples, seed = comp.calibration
  check_calibration_size(examples, setup.input_cfg, prepared_only=False)
  it = pipeline.train_iterator(dataclasses.replace(setup.input_cfg, seed=seed))
  batches = [sharding.global_batch(model_inputs(next(it), setup.family, setup.task),
                                   sharding.batch_sharding(setup.mesh))
             for _ in range(examples // setup.input_cfg.batch_size)]
  params, cstate = comp.plan.calibrate(setup.family.apply, state.params,
                                       comp.plan.merge(state.cstate, state.aux), batches,
                                       *calibration_context(setup.family, setup.task))
  trained, cstate = comp.plan.split(cstate)
  log(f"[compress] calibrated {comp.plan.name} on {examples} examples ({len(batches)} "
      f"batches, seed {seed}) in {time.perf_counter() - t0:.1f} s")
  return state.replace(params=jax.device_put(params, state_shd.params),
                       cstate=jax.device_put(cstate, state_shd.cstate),
                       aux=jax.device_put({**state.aux, **trained}, state_shd.aux))


# ============================================================================ the loop

def _loop(state, train_step, batch, train_iter, setup, ckpt, config, workdir, eval_step, log):
  """Train to `total_steps`: log, evaluate, checkpoint. -> (state, eval metrics, eval s)."""
  t, total = config.train, setup.total_steps
  batch_shd = sharding.batch_sharding(setup.mesh)
  writer = MetricsWriter(workdir)
  step = int(jax.device_get(state.step))
  progress = Progress(total, setup.input_cfg.batch_size, step, jax.process_index() == 0,
                      setup.task.metric)
  pending, history, eval_metrics, eval_s = None, [], {}, 0.0
  last_ckpt = step if step else None

  def check_finite(metrics, at_step):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      ckpt.wait()
      kept = (f"The last good checkpoint (step {last_ckpt}) stays in {ckpt.directory}"
              if last_ckpt is not None else "No checkpoint had been saved yet")
      raise NonFiniteLossError(
          f"loss is {loss} at step {at_step}; stopping without saving. {kept}. Lower "
          "config.optimizer.lr or set config.optimizer.clip_norm, then resume or start a "
          "new workdir.")

  def run_eval(at):
    nonlocal eval_s
    t0 = time.perf_counter()
    m = evaluate(eval_step, state.params, state.cstate, setup, batch_shd, state.aux)
    writer.write(at, m, "eval")
    log(f"[eval] step {at}{' (no training)' if total == 0 else ''}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in m.items() if k != "examples")
        + f" on {int(m['examples'])} examples")
    eval_s += time.perf_counter() - t0
    return m

  while step < total:
    state, metrics = train_step(state, batch)
    step += 1
    if pending is not None:  # the previous step's loss is ready by now: no stall
      history.append(jax.device_get(pending[1]))
      check_finite(history[-1], pending[0])
    pending = (step, metrics)
    # where the data stand after `step` batches: what a checkpoint at `step` records
    data_state = {"iterator": train_iter.get_state()}
    if step < total:
      batch = sharding.global_batch(model_inputs(next(train_iter), setup.family, setup.task),
                                    batch_shd)
    if step % int(t.log_every) == 0 or step == total:
      history.append(jax.device_get(metrics))
      check_finite(history[-1], step)
      pending = None
      mean = {k: float(np.mean([h[k] for h in history])) for k in history[-1]}
      mean["lr"] = float(history[-1]["lr"])
      mean["steps_per_s"] = progress.update(step, mean)
      writer.write(step, mean, "train")
      history = []
    if step % int(t.eval_every) == 0 or step == total:
      eval_metrics = run_eval(step)
      progress.restart(step)
    if step % int(t.checkpoint_every) == 0 or step == total:
      if pending is not None:
        check_finite(jax.device_get(pending[1]), pending[0])
      ckpt.save(step, state, data_state)
      last_ckpt = step
  if not eval_metrics:  # steps=0 (PTQ), or resumed after the final checkpoint: evaluate
    eval_metrics = run_eval(step)
    if last_ckpt is None:
      ckpt.save(step, state, {"iterator": train_iter.get_state()})
  ckpt.close()
  writer.close()
  return state, eval_metrics, eval_s


# ============================================================================ the run

def _write_summary(workdir, summary, log):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  log("=" * 72 + f"\ndone: {summary['step']} steps in {summary['wall_s']:.1f} s (compile "
      f"{summary['compile_s']:.1f} s), {summary['parameters']:,} parameters\nfinal eval: "
      + ", ".join(f"{k[5:]} {v:.4f}" for k, v in summary.items()
                  if k.startswith("eval_") and k not in ("eval_examples", "eval_s"))
      + f" on {int(summary['eval_examples'])} examples\ncheckpoints: {summary['checkpoint_dir']}"
      f"\nmetrics: {os.path.join(workdir, 'metrics.jsonl')} and "
      f"{os.path.join(workdir, 'tensorboard')}\n" + "=" * 72)


class Programs(NamedTuple):
  steps: step_lib.Steps
  init_fn: Callable  # (params, frozen) -> TrainState
  fresh: Callable    # () -> freshly initialised params


def programs(config, setup: Setup) -> Programs:
  """The model and its pure step functions for a validated config (what is jitted: the
  trainer runs them, `mmjax.cli.lowering` lowers them for other platforms)."""
  fam = setup.family
  tx, lr_schedule = optim.make_optimizer(config.optimizer, setup.total_steps)
  steps = make_steps(fam, setup.task, tx, lr_schedule, setup.compression.plan)
  seed, sample = int(config.seed), fam.example_batch(1, seed=0)
  init_fn = lambda params, frozen: steps.init(params, jax.random.PRNGKey(seed), sample, frozen)
  fresh = lambda: fam.init(jax.random.fold_in(jax.random.PRNGKey(seed), 1), sample)
  return Programs(steps, init_fn, fresh)


def check_hooks(plan, fam: Family, abstract) -> None:
  """The plan's module hooks against the family's forward (training mode, the compressed
  weights), traced for shapes only from the abstract train state: a pattern that matches
  no module, or an output the next module cannot take, is a ValueError before anything is
  compiled or written."""
  if plan is None or not plan.hooks({}):
    return
  apply = lambda p, b: fam.apply(p, b, jax.random.PRNGKey(0))
  def check(params, cstate):
    plan.check_hooks(apply, params, cstate, fam.example_batch(1, seed=0))
  jax.eval_shape(check, abstract.params, plan.merge(abstract.cstate, abstract.aux))


def check_losses(plan, fam: Family, abstract, frozen) -> None:
  """The methods' loss terms on the compressed forward, traced for shapes only: a term that
  cannot be computed (a distillation whose layers cannot pair) is an error before anything
  is compiled or written. The task's loss is not traced here (its labels may need more than
  the family's example batch)."""
  if plan is None or not plan.has_loss:
    return
  apply = lambda p, b: fam.apply(p, b, jax.random.PRNGKey(0))
  sample = {**fam.example_batch(1, seed=0, with_labels=False),
            "example_mask": np.ones((1,), bool)}

  def run(params, cstate, aux, frozen):
    merged = plan.merge(cstate, aux)
    out, inter = plan.wrap(apply, merged, flatten(params))(plan.view(params, merged), sample)
    return plan.loss(Forward(out, inter, sample), cstate, aux, frozen)[0]
  jax.eval_shape(run, abstract.params, abstract.cstate, abstract.aux, frozen)


def train_and_evaluate(config, workdir: str, log=print, plan=None) -> dict:
  """Train, evaluate and checkpoint one experiment; returns the final summary. `plan`
  replaces the compression plan config.compress builds (a method written in a notebook)."""
  t_start = time.perf_counter()
  setup = validate(config, plan)
  comp, fam, mesh = setup.compression, setup.family, setup.mesh
  workdir, fsdp = os.path.abspath(workdir), bool(config.mesh.get("fsdp", False))
  check_workdir(workdir)
  steps, init_fn, fresh = programs(config, setup)
  batch_shd = sharding.batch_sharding(mesh)

  # ---- state: abstract first (nothing allocated); frozen inputs (a teacher) outside it
  frozen_abs = {f.name: sharding.sharded_abstract(f.abstract, mesh, fsdp) for f in comp.frozen}
  abstract, state_shd = sharding.sharded_abstract(jax.eval_shape(
      init_fn, jax.eval_shape(fresh), {k: a for k, (a, _) in frozen_abs.items()}), mesh, fsdp)
  check_hooks(comp.plan, fam, abstract)
  check_losses(comp.plan, fam, abstract, {k: a for k, (a, _) in frozen_abs.items()})
  ckpt_path, init_dir = os.path.join(workdir, "checkpoints"), config.get("init")
  # every process takes the branch process 0's view of the workdir decides
  resuming = (sharding.process0_decides(os.path.isdir(ckpt_path))
              and checkpointing.check_resumable(ckpt_path, abstract, workdir))
  # config.init read before the workdir is touched (a bad checkpoint writes nothing)
  loaded = init_params(init_dir, fam, abstract.params) if init_dir and not resuming else None

  # ---- from here on the workdir is written
  if jax.process_index() == 0:
    sources.ensure_prepared(setup.input_cfg.dataset, setup.input_cfg.data_dir,
                            config.data.get("num_train"), config.data.get("num_test"), log,
                            download=setup.input_cfg.download)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  sharding.barrier("mmjax:workdir_ready")
  ckpt = checkpointing.Checkpointer(ckpt_path, keep=int(config.train.keep_checkpoints),
                                    async_save=bool(config.train.get("async_checkpoints", True)))
  train_iter = pipeline.train_iterator(setup.input_cfg)
  frozen = {}
  for f in comp.frozen:  # restored, never part of the train state
    frozen[f.name] = checkpointing.restore_params_from(f.checkpoint_dir, frozen_abs[f.name][0])
    log(f"[{f.name}] {f.label} from {f.checkpoint_dir} "
        f"({sum(x.size for x in jax.tree.leaves(frozen[f.name])):,} parameters)")
  restored = ckpt.restore_latest(abstract, log=log) if resuming else None
  if restored is not None:
    resume_step, state, data_state = restored
    train_iter.set_state(data_state["iterator"])
    log(f"[init] resumed from {ckpt_path} at step {resume_step}")
  else:
    resume_step = 0
    params, source = (loaded or init_params(init_dir, fam, abstract.params) if init_dir
                      else (jax.jit(fresh)(), None))
    state = jax.jit(init_fn, out_shardings=state_shd)(params, frozen)
    log(f"[init] params from {source}" if init_dir else "[init] fresh initialisation")
    if comp.calibration:
      state = _calibrate(comp, state, state_shd, setup, log)

  # ---- compile, train
  t0 = time.perf_counter()
  jitted = jax.jit(steps.train_step, in_shardings=(state_shd, batch_shd, {
      k: s for k, (_, s) in frozen_abs.items()}), out_shardings=(state_shd, None),
      donate_argnums=(0,))
  eval_step = jax.jit(steps.eval_step, in_shardings=(state_shd.params, state_shd.cstate,
                                                     batch_shd, state_shd.aux))
  train_step = first = None
  if resume_step < setup.total_steps:
    first = sharding.global_batch(model_inputs(next(train_iter), fam, setup.task), batch_shd)
    compiled = jitted.lower(state, first, frozen).compile()
    train_step = lambda state, batch: compiled(state, batch, frozen)
  compile_s = time.perf_counter() - t0
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  log(f"[train] {n_params:,} parameters, {mesh.shape[sharding.AXIS]} device(s) "
      f"({jax.default_backend()}, {jax.process_count()} process(es)), global batch "
      f"{setup.input_cfg.batch_size}, compiled in {compile_s:.1f} s")
  loop_start = time.perf_counter()
  state, eval_metrics, eval_s = _loop(state, train_step, first, train_iter, setup, ckpt,
                                      config, workdir, eval_step, log)
  loop_s = time.perf_counter() - loop_start - eval_s  # training, input, logging, saving

  # ---- outputs
  if not comp.plan.is_identity:
    dense = lambda: jax.device_get(init_params(init_dir, fam, abstract.params)[0]
                                   if init_dir else jax.jit(fresh)())
    compress_finish.write(config, workdir, comp, state, eval_metrics, dense, fam, log,
                          setup.task.metric)
  step = int(jax.device_get(state.step))
  cost = {}
  if int(config.train.get("measure_forward") or 0) > 0:
    cost = forward_cost.measure(fam, comp.plan, state.params, comp.plan.merge(
        state.cstate, state.aux), int(config.train.measure_forward))
    log(f"[cost] forward of {cost['batch']}: {cost['forward_flops'] / 1e6:.2f} MFLOPs an "
        f"example ({cost['forward_flops'] / max(cost['dense_forward_flops'], 1):.3f}x "
        f"dense), {cost['forward_ms']:.1f} ms ({cost['dense_forward_ms'] / cost['forward_ms']:.2f}x"
        " dense throughput)")
  summary = dict(step=step, parameters=n_params, wall_s=time.perf_counter() - t_start,
                 compile_s=compile_s, loop_s=loop_s, eval_s=eval_s,
                 steps_run=step - resume_step, checkpoint_dir=ckpt_path,
                 **{f"eval_{k}": v for k, v in eval_metrics.items()},
                 **{f"cost_{k}": v for k, v in cost.items()})
  _write_summary(workdir, summary, log)
  return summary
