"""The trainer: every experiment runs `train_and_evaluate(config, workdir)`.

Reads top to bottom: the task (loss and metrics of mmjax's models) -> setup (everything
validated from the config before anything is compiled or written) -> state (resume rules)
-> the loop (train, log, evaluate, checkpoint) -> the run (summary, compression outputs).
The step itself is `mmjax.compress.step`, which knows no model and no compression method:
this file is its first client, and names no compression family.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import checkpointing, compress_config, compress_finish, optim, sharding
from mmjax.compress import step as step_lib
from mmjax.compress_config import abstract_params, param_shapes  # noqa: F401 (re-exported)
from mmjax.data import pipeline, sources
from mmjax.metrics_writer import MetricsWriter, Progress
from mmjax.models import ModelConfig, MultimodalModel, random_inputs

TrainState = step_lib.TrainState


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stops and the last good checkpoint stays."""


# ============================================================================ the task

def loss_sums(logits, batch, cfg: ModelConfig):
  """(cross-entropy sum, correct count, count) over real examples (and, for a per-token
  head, real tokens). Sums, so that eval batches add up exactly."""
  labels = batch["label"]
  weights = batch["example_mask"].astype(jnp.float32)
  if logits.ndim == 3:  # per-token head: weight by the token modality's mask
    weights = weights[:, None] * batch[f"{cfg.head.token_modality}_mask"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return (ce * weights).sum(), (correct * weights).sum(), weights.sum()


def make_steps(model, cfg: ModelConfig, tx, schedule=None, plan=None) -> step_lib.Steps:
  """The compressed step for an mmjax model: cross-entropy, accuracy, eval sums."""
  def apply_fn(params, batch, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    return model.apply({"params": params}, batch, rngs=rngs)

  def loss_fn(logits, batch):
    loss_sum, correct, count = loss_sums(logits, batch, cfg)
    count = jnp.maximum(count, 1.0)
    return loss_sum / count, {"accuracy": correct / count}

  def eval_fn(logits, batch):
    loss_sum, correct, count = loss_sums(logits, batch, cfg)
    return dict(count=count, loss_sum=loss_sum, correct=correct)

  return step_lib.build(apply_fn, loss_fn, tx, plan, eval_fn=eval_fn, schedule=schedule,
                        apply_rng=True)


def model_inputs(batch: dict, modalities) -> dict:
  """The keys a step reads: each modality, its padding mask if the pipeline gave one, the
  label and the example mask (analysis fields stay on the host)."""
  keep = set(modalities) | {f"{m}_mask" for m in modalities} | {"label", "example_mask"}
  return {k: v for k, v in batch.items() if k in keep}


def evaluate(eval_step, params, cstate, input_cfg, batch_sharding, modalities):
  """Every example of the eval split exactly once; returns loss and accuracy."""
  totals = dict(count=0.0, loss_sum=0.0, correct=0.0)
  # dispatched batch after batch and read once at the end: no host stall per batch
  outs = [eval_step(params, cstate, sharding.global_batch(model_inputs(local, modalities),
                                                          batch_sharding))
          for local in pipeline.eval_batches(input_cfg)]
  for out in jax.device_get(outs):  # summed on the host in float64, in batch order
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["count"], 1.0)
  return dict(loss=totals["loss_sum"] / n, accuracy=totals["correct"] / n,
              examples=totals["count"])


# ============================================================================ setup

def input_config(config) -> pipeline.InputConfig:
  d = config.data
  return pipeline.InputConfig(
      dataset=d.dataset, data_dir=d.get("data_dir") or sources.default_data_dir(),
      batch_size=int(d.batch_size), seed=int(config.seed),
      modalities=tuple(sorted(config.model.towers.keys())),
      text_len=int(d.get("text_len", 48)), audio_samples=int(d.get("audio_samples", 8000)),
      num_threads=int(d.get("num_threads", 2)), prefetch=int(d.get("prefetch", 4)),
      download=bool(d.get("download", False)))


def model_config(config) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict())


@dataclasses.dataclass
class Setup:
  """Everything validated from the config before anything is compiled or written."""
  model_cfg: ModelConfig
  input_cfg: pipeline.InputConfig
  mesh: Any
  total_steps: int
  compression: compress_config.Compression


def validate(config, plan=None, read_checkpoints: bool = True) -> Setup:
  """All config errors, raised before compilation and before the workdir is touched;
  `plan` replaces the plan config.compress builds (a method written in a notebook);
  `read_checkpoints=False`: shapes only, no teacher checkpoint read (`mmjax.lowering`)."""
  model_cfg, input_cfg, t = model_config(config), input_config(config), config.train
  for field in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    if int(t[field]) <= 0 and not (field == "steps" and int(t[field]) == 0
                                   and config.get("init")):
      raise ValueError(f"config.train.{field}={t[field]} must be a positive integer "
                       "(steps=0 is allowed with config.init: evaluate, compress and export "
                       "a trained checkpoint without training, e.g. post-training "
                       "quantization).")
  optim.validate(config.optimizer, max(int(t.steps), 1))
  mesh = sharding.make_mesh(int(config.mesh.get("data", -1)))
  n_dev = mesh.shape[sharding.AXIS]
  if input_cfg.batch_size % n_dev:
    raise ValueError(f"config.data.batch_size={input_cfg.batch_size} is not divisible by the "
                     f"{n_dev} devices of the mesh; use a multiple of {n_dev}, or set "
                     "config.mesh.data to a divisor of it.")
  pipeline.host_batch_size(input_cfg.batch_size, jax.process_count())
  pipeline._prep_fn(input_cfg)  # modality / adapter checks
  compression = compress_config.build(config, model_cfg,
                                     read_checkpoints=read_checkpoints)
  if plan is not None:
    shapes = param_shapes(model_cfg)
    compression = dataclasses.replace(
        compression, plan=plan.check(shapes), calibration=compress_config.calibration_of(
            config) if plan.needs_calibration(list(shapes)) else ())
  if compression.calibration:
    check_calibration_size(compression.calibration[0], input_cfg)
  return Setup(model_cfg, input_cfg, mesh, int(t.steps), compression)


def check_workdir(workdir: str):
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent) or "."
  try:
    if not os.path.isdir(parent):
      raise OSError(f"{parent} is not a directory")
    with tempfile.TemporaryFile(dir=parent):  # the only honest test, also for root
      pass
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not writable ({e}); choose a directory you "
                     "can write to.") from None


def check_calibration_size(examples: int, input_cfg, prepared_only: bool = True):
  """config.calibration.examples must fit in the training split (checked at config time
  when the dataset is already prepared, and again before calibrating)."""
  if prepared_only:
    builder = sources.get_builder(input_cfg.dataset, input_cfg.data_dir or
                                  sources.default_data_dir())
    if not builder.is_prepared():
      return
    n = builder.info.splits[input_cfg.train_split].num_examples
  else:
    n = len(sources.open_split(input_cfg.dataset, input_cfg.train_split, input_cfg.data_dir))
  if examples > n:
    raise ValueError(f"config.calibration.examples={examples} exceeds the {n} examples of "
                     f"{input_cfg.dataset}'s {input_cfg.train_split} split; use at most {n}.")


def _calibrate(comp, model, state, state_shd, setup, log):
  """The plan's calibration stages on a few training batches, read by a separate iterator
  (the training order is untouched), through the compressed weights."""
  t0 = time.perf_counter()
  examples, seed = comp.calibration
  check_calibration_size(examples, setup.input_cfg, prepared_only=False)
  it = pipeline.train_iterator(dataclasses.replace(setup.input_cfg, seed=seed))
  batches = [sharding.global_batch(model_inputs(next(it), setup.model_cfg.modalities),
                                   sharding.batch_sharding(setup.mesh))
             for _ in range(examples // setup.input_cfg.batch_size)]
  params, cstate = comp.plan.calibrate(lambda p, b: model.apply({"params": p}, b),
                                       state.params, state.cstate, batches)
  log(f"[compress] calibrated {comp.plan.name} on {examples} examples ({len(batches)} "
      f"batches, seed {seed}) in {time.perf_counter() - t0:.1f} s")
  return state.replace(params=jax.device_put(params, state_shd.params),
                       cstate=jax.device_put(cstate, state_shd.cstate))


# ============================================================================ the loop

def _loop(state, train_step, batch, train_iter, setup, ckpt, config, workdir, eval_step, log):
  """Train to `total_steps`: log, evaluate, checkpoint. -> (state, eval metrics, eval s)."""
  t, total = config.train, setup.total_steps
  mods, batch_shd = setup.model_cfg.modalities, sharding.batch_sharding(setup.mesh)
  writer = MetricsWriter(workdir)
  step = int(jax.device_get(state.step))
  progress = Progress(total, setup.input_cfg.batch_size, step, enabled=jax.process_index() == 0)
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
    m = evaluate(eval_step, state.params, state.cstate, setup.input_cfg, batch_shd, mods)
    writer.write(at, m, "eval")
    log(f"[eval] step {at}{' (no training)' if total == 0 else ''}: loss {m['loss']:.4f}, "
        f"accuracy {m['accuracy']:.4f} on {int(m['examples'])} examples")
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
      batch = sharding.global_batch(model_inputs(next(train_iter), mods), batch_shd)
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
      f"accuracy {summary['eval_accuracy']:.4f}, loss {summary['eval_loss']:.4f} on "
      f"{int(summary['eval_examples'])} examples\ncheckpoints: {summary['checkpoint_dir']}"
      f"\nmetrics: {os.path.join(workdir, 'metrics.jsonl')} and "
      f"{os.path.join(workdir, 'tensorboard')}\n" + "=" * 72)


class Programs(NamedTuple):
  model: Any
  steps: step_lib.Steps
  init_fn: Callable  # (params, frozen) -> TrainState
  fresh: Callable    # () -> freshly initialised params


def programs(config, setup: Setup) -> Programs:
  """The model and its pure step functions for a validated config (what is jitted: the
  trainer runs them, `mmjax.lowering` lowers them for other platforms)."""
  model, cfg = MultimodalModel(setup.model_cfg), setup.model_cfg
  tx, schedule = optim.make_optimizer(config.optimizer, setup.total_steps)
  steps = make_steps(model, cfg, tx, schedule, setup.compression.plan)
  seed, sample = int(config.seed), random_inputs(cfg, 1, seed=0)
  init_fn = lambda params, frozen: steps.init(params, jax.random.PRNGKey(seed), sample, frozen)
  fresh = lambda: model.init(jax.random.fold_in(jax.random.PRNGKey(seed), 1), sample)["params"]
  return Programs(model, steps, init_fn, fresh)


def train_and_evaluate(config, workdir: str, log=print, plan=None) -> dict:
  """Train, evaluate and checkpoint one experiment; returns the final summary. `plan`
  replaces the compression plan config.compress builds (a method written in a notebook)."""
  t_start = time.perf_counter()
  setup = validate(config, plan)
  comp, cfg, mesh = setup.compression, setup.model_cfg, setup.mesh
  workdir, fsdp = os.path.abspath(workdir), bool(config.mesh.get("fsdp", False))
  check_workdir(workdir)
  model, steps, init_fn, fresh = programs(config, setup)
  batch_shd = sharding.batch_sharding(mesh)

  # ---- state: abstract first (nothing allocated); frozen inputs (a teacher) outside it
  frozen_abs = {f.name: sharding.sharded_abstract(f.abstract, mesh, fsdp) for f in comp.frozen}
  abstract, state_shd = sharding.sharded_abstract(jax.eval_shape(
      init_fn, jax.eval_shape(fresh), {k: a for k, (a, _) in frozen_abs.items()}), mesh, fsdp)
  ckpt_path, init_dir = os.path.join(workdir, "checkpoints"), config.get("init")
  # every process takes the branch process 0's view of the workdir decides
  resuming = (sharding.process0_decides(os.path.isdir(ckpt_path))
              and checkpointing.check_resumable(ckpt_path, abstract, workdir))
  if not resuming and init_dir:  # (checked again below if every saved step is unreadable)
    checkpointing.require_checkpoint(init_dir, "config.init")

  # ---- from here on the workdir is written
  if jax.process_index() == 0:
    sources.ensure_prepared(setup.input_cfg.dataset, setup.input_cfg.data_dir,
                            config.data.get("num_train"), config.data.get("num_test"), log)
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
    init_step = init_dir and checkpointing.require_checkpoint(init_dir, "config.init")
    params = (checkpointing.restore_params_from(init_dir, abstract.params, init_step)
              if init_dir else jax.jit(fresh)())
    state = jax.jit(init_fn, out_shardings=state_shd)(params, frozen)
    log(f"[init] params from {init_dir} (step {init_step})" if init_dir
        else "[init] fresh initialisation")
    if comp.plan.needs_calibration(list(param_shapes(cfg))):
      state = _calibrate(comp, model, state, state_shd, setup, log)

  # ---- compile, train
  t0 = time.perf_counter()
  jitted = jax.jit(steps.train_step, in_shardings=(state_shd, batch_shd, {
      k: s for k, (_, s) in frozen_abs.items()}), out_shardings=(state_shd, None),
      donate_argnums=(0,))
  eval_step = jax.jit(steps.eval_step, in_shardings=(state_shd.params, state_shd.cstate,
                                                     batch_shd))
  train_step = first = None
  if resume_step < setup.total_steps:
    first = sharding.global_batch(model_inputs(next(train_iter), cfg.modalities), batch_shd)
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
    dense = lambda: jax.device_get(
        checkpointing.restore_params_from(init_dir, abstract.params) if init_dir
        else jax.jit(fresh)())
    compress_finish.write(config, workdir, comp, state, eval_metrics, dense, cfg, log)
  step = int(jax.device_get(state.step))
  summary = dict(step=step, parameters=n_params, wall_s=time.perf_counter() - t_start,
                 compile_s=compile_s, loop_s=loop_s, eval_s=eval_s,
                 steps_run=step - resume_step, checkpoint_dir=ckpt_path,
                 **{f"eval_{k}": v for k, v in eval_metrics.items()})
  _write_summary(workdir, summary, log)
  return summary
