"""The trainer: train state, pure train/eval steps, and the loop every experiment runs.

Reads top to bottom: config -> data -> model and optimizer -> devices -> state (resume
rules) -> the loop (train, log, evaluate, checkpoint) -> summary. `train_step` and
`eval_step` are pure functions of (state, batch), jitted with the state donated.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import checkpointing, optim, sharding
from mmjax.compress import Plan, build_plan, configure
from mmjax.compress.configure import abstract_params, param_shapes  # noqa: F401 (re-exported)
from mmjax.compress.distill import feature as distill_feature
from mmjax.data import pipeline, sources
from mmjax.metrics_writer import MetricsWriter, Progress
from mmjax.models import ModelConfig, MultimodalModel


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stops and the last good checkpoint stays."""


# ============================================================================ state

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  cstate: Any  # compression state: {"transforms": the plan's state; with distillation
  # "distill": its feature projections and their Adam state; with activation quantization
  # "activations": {Dense path: input scale}}
  rng: jax.Array  # raw uint32[2] key; the train step folds in the step and hands the
  # result to the model as its "dropout" stream (unused by today's layers)


def cstate_key(seed: int):
  return jax.random.fold_in(jax.random.PRNGKey(seed), 2)


def start_compression(plan: Plan, params, seed: int, distill=None, distill_aux=None):
  """-> (params, cstate): the plan's state, and the weights as it constrains them at step 0
  (pruning masks applied)."""
  params, transforms = plan.start(params, cstate_key(seed))
  cstate = {"transforms": transforms}
  if distill is not None:
    cstate["distill"] = distill_aux
  return params, cstate


def apply_model(model, variables, batch, cstate, act, **kwargs):
  """model.apply, with each Dense input quantized (or run in int8) when `act` is set."""
  if not act:
    return model.apply(variables, batch, **kwargs)
  from mmjax.compress import activations as act_lib
  with flax.linen.intercept_methods(
      act_lib.interceptor(cstate["activations"], act["bits"], act["mode"],
                          act.get("int8_grads", True))):
    return model.apply(variables, batch, **kwargs)


def make_init_fn(model, tx, sample_batch, seed: int, plan: Plan = Plan(), distill=None,
                 act=None):
  """`init(teacher_params=None) -> TrainState` (the teacher sizes the feature projections).
  Activation scales start at 1 and are calibrated once the weights are final."""
  def init(teacher_params=None):
    rng = jax.random.PRNGKey(seed)
    params = model.init(jax.random.fold_in(rng, 1), sample_batch)["params"]
    aux = None
    if distill is not None:
      _, inter = model.apply({"params": params}, sample_batch)
      s_feats = {f: distill_feature(inter, f) for f in distill.features}
      t_feats = distill.teacher_outputs(teacher_params, sample_batch)[1]
      aux = distill.init_aux(s_feats, t_feats, jax.random.fold_in(rng, 3))
    params, cstate = start_compression(plan, params, seed, distill, aux)
    if act:
      from mmjax.compress import activations as act_lib
      cstate["activations"] = {k: jnp.float32(1.0) for k in
                               act_lib.calibrate_trace(model, params, sample_batch)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      cstate=cstate, rng=rng)
  return init


# ============================================================================ steps

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


def make_train_step(model, tx, schedule, cfg: ModelConfig, plan: Plan = Plan(),
                    distill=None, act=None):
  """One step: the compressed view -> loss (+ distillation against the teacher's outputs,
  computed in the same step) -> optimizer update of the master params -> the compression
  update (schedules, masks re-applied), all in one jitted function.

  `train_step(state, batch, teacher_params=None)`: the teacher is an argument, not state.
  """
  def train_step(state: TrainState, batch, teacher_params=None):
    rng = jax.random.fold_in(state.rng, state.step)  # fresh per step, same on resume
    teacher = (distill.teacher_outputs(teacher_params, batch) if distill is not None
               else None)
    aux = state.cstate.get("distill")
    proj = aux["proj"] if aux is not None else None

    def loss_fn(params, proj):
      view = plan.forward(params, state.cstate["transforms"])
      logits, inter = apply_model(model, {"params": view}, batch, state.cstate, act,
                                  rngs={"dropout": rng})
      loss_sum, correct, count = loss_sums(logits, batch, cfg)
      count = jnp.maximum(count, 1.0)
      ce = loss_sum / count
      extra = {}
      loss = ce
      if distill is not None:
        loss, extra = distill.loss(logits, inter, ce, teacher, {"proj": proj}, batch)
        extra["ce"] = ce
      return loss, (correct / count, extra)

    (loss, (acc, extra)), (grads, aux_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, proj)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    transforms = state.cstate["transforms"]
    params, transforms = plan.update(params, transforms, state.step + 1)
    cstate = {**state.cstate, "transforms": transforms}
    if distill is not None:
      cstate["distill"] = distill.update_aux(aux, aux_grads)
    metrics = dict(loss=loss, accuracy=acc, lr=schedule(state.step),
                   grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                   update_norm=optax.global_norm(updates), **extra)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         cstate=cstate), metrics
  return train_step


def make_eval_step(model, cfg: ModelConfig, plan: Plan = Plan(), act=None):
  def eval_step(params, cstate, batch):
    logits, _ = apply_model(model, {"params": plan.forward(params, cstate["transforms"])},
                            batch, cstate, act)
    loss_sum, correct, count = loss_sums(logits, batch, cfg)
    return dict(count=count, loss_sum=loss_sum, correct=correct)
  return eval_step


def evaluate(eval_step_fn, params, cstate, input_cfg, batch_sharding, keys):
  """Every example of the eval split exactly once; returns loss and accuracy."""
  totals = dict(count=0.0, loss_sum=0.0, correct=0.0)
  for local in pipeline.eval_batches(input_cfg):
    out = jax.device_get(eval_step_fn(params, cstate,
                                      _to_global(local, keys, batch_sharding)))
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["count"], 1.0)
  return dict(loss=totals["loss_sum"] / n, accuracy=totals["correct"] / n,
              examples=totals["count"])


# ============================================================================ setup

def _all_agree(flag: bool) -> bool:
  """Process 0's value of `flag`, on every process."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _to_global(local, keys, batch_sharding):
  return sharding.global_batch({k: local[k] for k in keys}, batch_sharding)


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
  plan: Plan
  distill: Any = None  # compress.distill.Distill, when config.compress.distill is set
  teacher_dir: str | None = None
  activations: dict | None = None  # activation quantization settings


def validate(config) -> Setup:
  """All config errors, raised before compilation and before the workdir is touched."""
  model_cfg = model_config(config)
  input_cfg = input_config(config)
  t = config.train
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
  setup = Setup(model_cfg, input_cfg, mesh, int(t.steps), make_plan(config, model_cfg))
  d = config.get("compress", {}).get("distill") if config.get("compress") else None
  if d:
    setup.distill, setup.teacher_dir = configure.distill_settings(config, d)
  a = config.get("compress", {}).get("activations") if config.get("compress") else None
  if a:
    setup.activations = configure.activation_settings(a)
  return setup


def _calibrate(state, model, plan, act, setup, keys, batch_shd, state_shd, log):
  """Activation ranges from a few training batches (read by a separate iterator, so the
  training order is untouched), through the compressed weights."""
  from mmjax.compress import activations as act_lib
  it = pipeline.train_iterator(setup.input_cfg)
  batches = [_to_global(next(it), keys, batch_shd) for _ in range(act["calibration_batches"])]
  view = jax.jit(plan.forward)(state.params, state.cstate["transforms"])
  amax = act_lib.calibrate(model, view, batches, act["percentile"])
  scales = act_lib.scales_from_amax(amax, act["bits"])
  scales = jax.device_put(scales, state_shd.cstate["activations"])
  log(f"[compress] calibrated {len(scales)} Dense input ranges on "
      f"{len(batches)} batches ({act['mode']}, {act['bits']} bits)")
  return state.replace(cstate={**state.cstate, "activations": scales})


def make_plan(config, model_cfg: ModelConfig) -> Plan:
  compress = config.get("compress")
  if not compress or not compress.to_dict():
    return Plan()
  return build_plan(compress, param_shapes(model_cfg), model_cfg.num_heads)


def ensure_data(input_cfg, config, log=print):
  """Prepare an offline dataset that is missing from the data_dir (never downloads)."""
  name, _ = sources.split_name(input_cfg.dataset)
  builder = sources.get_builder(input_cfg.dataset, input_cfg.data_dir)
  if builder.is_prepared() or name not in sources.OFFLINE_BUILDERS:
    return
  log(f"[data] {input_cfg.dataset} is not prepared in {input_cfg.data_dir}: preparing it now")
  sources.prepare(input_cfg.dataset, input_cfg.data_dir,
                  num_train=config.data.get("num_train"), num_test=config.data.get("num_test"),
                  log=log)


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


# ============================================================================ the loop

def _dense_accuracy(config):
  """The accuracy of the run this one started from (config.init), if it recorded one."""
  init = config.get("init")
  if not init:
    return None
  for d in (init, os.path.dirname(os.path.normpath(init))):
    path = os.path.join(d, "summary.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f).get("eval_accuracy")
  return None


def _compression_report(config, workdir, plan, state, eval_metrics, log, dense_params_fn,
                        model_cfg, act=None):
  """compression_report.json, the printed table, and (config.compress.export, default on)
  the real compressed export in <workdir>/export, its bytes on disk measured next to a
  dense fp32 export, written the same way, of the uncompressed weights this run started
  from (config.init's, else the fresh initialisation): a dense model's bytes, which zstd
  cannot shrink by finding the zeros that pruning made. Two references: raw fp32 (4 bytes a
  parameter; `disk_ratio`) and zstd'd fp32 as Orbax checkpoints are (`disk_ratio_zstd`)."""
  from mmjax.compress import export, report
  extra = {}
  if act:
    extra["activations"] = dict(act, layers=len(state.cstate["activations"]))
  if config.compress.get("export", True):
    params, cstate = report.host_tree(state.params), report.host_tree(state.cstate["transforms"])
    if jax.process_index() == 0:
      out = os.path.join(workdir, "export")
      export.export(params, out, plan, cstate)
      extra.update(export_dir=out, disk_bytes=export.disk_bytes(out))
      dense = dense_params_fn()
      import shutil
      for suffix, zstd in (("", False), ("_zstd", True)):
        dense_dir = os.path.join(workdir, f"export_dense_fp32{suffix}.tmp")
        export.export(dense, dense_dir, zstd=zstd)
        extra[f"disk_bytes_dense{suffix}"] = export.disk_bytes(dense_dir)
        extra[f"disk_ratio{suffix}"] = extra[f"disk_bytes_dense{suffix}"] / extra["disk_bytes"]
        shutil.rmtree(dense_dir)
  info = plan.describe(state.params, state.cstate["transforms"])
  if any("structured" in d for d in info.values()):
    from mmjax.compress import structured
    view = report.host_tree(jax.jit(plan.forward)(state.params, state.cstate["transforms"]))
    small, small_cfg = structured.shrink(view, report.host_tree(info), model_cfg)
    if jax.process_index() == 0:
      n = structured.save_shrunk(os.path.join(workdir, "shrunk"), small, small_cfg)
      extra.update(shrunk_dir=os.path.join(workdir, "shrunk"), shrunk_parameters=n,
                   shrunk_model=dict(num_heads=small_cfg.num_heads,
                                     head_dim=small_cfg.head_dim, mlp_dim=small_cfg.mlp_dim))
      log(f"[compress] physically shrunk model ({n:,} parameters) in {extra['shrunk_dir']}")
  rep = report.build(state.params, plan, state.cstate["transforms"], accuracy=eval_metrics.get("accuracy"),
                     dense_accuracy=_dense_accuracy(config), **extra)
  if jax.process_index() == 0:
    path = report.write(workdir, rep)
    log(report.format_table(rep))
    log(f"compression report: {path}")
  return rep


def train_and_evaluate(config, workdir: str, log=print, plan: Plan | None = None) -> dict:
  """Train, evaluate and checkpoint one experiment; returns the final summary.

  `plan` replaces the compression plan built from `config.compress` (a transform written
  in a notebook, say); the config then records only its name under compress_plan."""
  t_start = time.perf_counter()
  setup = validate(config)
  if plan is not None:
    setup.plan = plan
  plan = setup.plan
  workdir = os.path.abspath(workdir)
  check_workdir(workdir)
  model = MultimodalModel(setup.model_cfg)
  tx, schedule = optim.make_optimizer(config.optimizer, setup.total_steps)
  mesh = setup.mesh
  batch_shd = sharding.batch_sharding(mesh)
  keys = list(setup.model_cfg.modalities) + [
      f"{m}_mask" for m in setup.model_cfg.modalities
      if setup.model_cfg.towers[m].kind in ("text", "audio")] + ["label", "example_mask"]

  # ---- state: abstract first (nothing allocated), then the resume rules
  from mmjax.models import random_inputs
  sample = random_inputs(setup.model_cfg, 1, seed=0)
  distill = setup.distill
  act = setup.activations
  init_fn = make_init_fn(model, tx, sample, int(config.seed), plan, distill, act)
  fsdp = bool(config.mesh.get("fsdp", False))
  teacher_abstract = teacher_shd = None
  if distill is not None:
    teacher_abstract = abstract_params(distill.teacher_model.cfg)
    teacher_shd = sharding.state_shardings(teacher_abstract, mesh, fsdp)
    teacher_abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        teacher_abstract, teacher_shd)
  abstract = jax.eval_shape(init_fn, teacher_abstract)
  state_shd = sharding.state_shardings(abstract, mesh, fsdp)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shd)
  ckpt_path = os.path.join(workdir, "checkpoints")
  resume_step = None
  # Every process must take the same branch (Orbax managers synchronise across processes),
  # so process 0's view of the workdir decides, before anyone writes to it.
  if _all_agree(os.path.isdir(ckpt_path)):
    reader = checkpointing.Checkpointer(ckpt_path, read_only=True)
    resume_step = reader.latest_step()
    if resume_step is not None:
      try:
        reader.check_fits(resume_step, abstract, what="the workdir's checkpoint")
      except checkpointing.CheckpointMismatchError as e:
        raise checkpointing.CheckpointMismatchError(
            f"{e}. Resume it with the config it was trained with "
            f"({os.path.join(workdir, 'config.json')}), or use a new --workdir.") from None
    reader.close()
  init_dir = config.get("init")
  if resume_step is None and init_dir:
    init_reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(init_dir),
                                             read_only=True)
    init_step = init_reader.latest_step()
    if init_step is None:
      raise ValueError(f"config.init={init_dir} holds no checkpoint; point it at an earlier "
                       "run's workdir or its checkpoints directory.")

  # ---- from here on the workdir is written
  if jax.process_index() == 0:
    ensure_data(setup.input_cfg, config, log)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  _barrier("mmjax:workdir_ready")
  ckpt = checkpointing.Checkpointer(ckpt_path, keep=int(config.train.keep_checkpoints),
                                    async_save=bool(config.train.get("async_checkpoints", True)))
  train_iter = pipeline.train_iterator(setup.input_cfg)
  teacher_params = None
  if distill is not None:  # frozen, outside the train state: never saved with the student
    reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(setup.teacher_dir),
                                        read_only=True)
    teacher_params = reader.restore_params(reader.latest_step(), teacher_abstract)
    reader.close()
    log(f"[distill] teacher from {setup.teacher_dir} "
        f"({sum(x.size for x in jax.tree.leaves(teacher_params)):,} parameters)")
  if resume_step is not None:
    state, data_state = ckpt.restore(resume_step, abstract)
    train_iter.set_state(data_state["iterator"])
    log(f"[init] resumed from {ckpt_path} at step {resume_step}")
  else:
    state = jax.jit(init_fn, out_shardings=state_shd)(teacher_params)
    if init_dir:
      params = init_reader.restore_params(init_step, abstract.params)
      # the compression state starts from these weights (one-shot masks of a trained model)
      params, transforms = jax.jit(plan.start, out_shardings=(
          state_shd.params, state_shd.cstate["transforms"]))(params, cstate_key(int(config.seed)))
      cstate = {**state.cstate, "transforms": transforms}
      state = state.replace(params=params, cstate=cstate, opt_state=jax.jit(
          tx.init, out_shardings=state_shd.opt_state)(params))
      init_reader.close()
      log(f"[init] params from {init_dir} (step {init_step})")
    else:
      log("[init] fresh initialisation")
    if act:
      state = _calibrate(state, model, plan, act, setup, keys, batch_shd, state_shd, log)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))

  # ---- compile
  t0 = time.perf_counter()
  step_fn = make_train_step(model, tx, schedule, setup.model_cfg, plan, distill, act)
  if distill is None:
    train_step = jax.jit(step_fn, in_shardings=(state_shd, batch_shd),
                         out_shardings=(state_shd, None), donate_argnums=(0,))
  else:
    train_step = jax.jit(step_fn, in_shardings=(state_shd, batch_shd, teacher_shd),
                         out_shardings=(state_shd, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model, setup.model_cfg, plan, act),
                      in_shardings=(state_shd.params, state_shd.cstate, batch_shd))
  first_local = next(train_iter)
  first = _to_global(first_local, keys, batch_shd)
  if setup.total_steps == 0:  # evaluate/compress/export only (e.g. PTQ): nothing to train
    pass
  elif distill is None:
    train_step = train_step.lower(state, first).compile()
  else:
    compiled = train_step.lower(state, first, teacher_params).compile()
    train_step = lambda state, batch: compiled(state, batch, teacher_params)
  compile_s = time.perf_counter() - t0
  log(f"[train] {n_params:,} parameters, {mesh.shape[sharding.AXIS]} device(s) "
      f"({jax.default_backend()}, {jax.process_count()} process(es)), global batch "
      f"{setup.input_cfg.batch_size}, compiled in {compile_s:.1f} s")

  writer = MetricsWriter(workdir)
  t = config.train
  step = int(jax.device_get(state.step))
  progress = Progress(setup.total_steps, setup.input_cfg.batch_size, step,
                      enabled=jax.process_index() == 0)
  pending, history = None, []
  last_ckpt = resume_step
  batch = first
  eval_metrics = {}

  def check_finite(metrics, at_step):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      ckpt.wait()
      kept = (f"The last good checkpoint (step {last_ckpt}) stays in {ckpt_path}"
              if last_ckpt is not None else "No checkpoint had been saved yet")
      raise NonFiniteLossError(
          f"loss is {loss} at step {at_step}; stopping without saving. {kept}. Lower "
          "config.optimizer.lr or set config.optimizer.clip_norm, then resume or start a "
          "new workdir.")
    return loss

  loop_start, eval_s = time.perf_counter(), 0.0
  while step < setup.total_steps:
    state, metrics = train_step(state, batch)
    step += 1
    if pending is not None:  # the previous step's loss is ready by now: no stall
      history.append(jax.device_get(pending[1]))
      check_finite(history[-1], pending[0])
    pending = (step, metrics)
    # Where the data stand after `step` batches: what a checkpoint at `step` must record
    # (taken before the next batch is read ahead).
    data_state = {"iterator": train_iter.get_state()}
    if step < setup.total_steps:
      batch = _to_global(next(train_iter), keys, batch_shd)
    if step % int(t.log_every) == 0 or step == setup.total_steps:
      history.append(jax.device_get(metrics))
      check_finite(history[-1], step)
      pending = None
      mean = {k: float(np.mean([h[k] for h in history])) for k in history[-1]}
      mean["lr"] = float(history[-1]["lr"])
      mean["steps_per_s"] = progress.update(step, mean)
      writer.write(step, mean, "train")
      history = []
    if step % int(t.eval_every) == 0 or step == setup.total_steps:
      t_eval = time.perf_counter()
      eval_metrics = evaluate(eval_step, state.params, state.cstate, setup.input_cfg,
                              batch_shd, keys)
      writer.write(step, eval_metrics, "eval")
      log(f"[eval] step {step}: loss {eval_metrics['loss']:.4f}, accuracy "
          f"{eval_metrics['accuracy']:.4f} on {int(eval_metrics['examples'])} examples")
      progress.restart(step)
      eval_s += time.perf_counter() - t_eval
    if step % int(t.checkpoint_every) == 0 or step == setup.total_steps:
      if pending is not None:
        check_finite(jax.device_get(pending[1]), pending[0])
      ckpt.save(step, state, data_state)
      last_ckpt = step
  if setup.total_steps == 0 and step == 0:
    t_eval = time.perf_counter()
    eval_metrics = evaluate(eval_step, state.params, state.cstate, setup.input_cfg, batch_shd,
                            keys)
    writer.write(0, eval_metrics, "eval")
    log(f"[eval] step 0 (no training): loss {eval_metrics['loss']:.4f}, accuracy "
        f"{eval_metrics['accuracy']:.4f} on {int(eval_metrics['examples'])} examples")
    eval_s += time.perf_counter() - t_eval
    ckpt.save(0, state, {"iterator": train_iter.get_state()})
  ckpt.close()
  writer.close()
  loop_s = time.perf_counter() - loop_start - eval_s  # training, input, logging, saving

  if not plan.is_identity:
    def dense_params():
      if init_dir:
        reader = checkpointing.Checkpointer(checkpointing.checkpoint_dir(init_dir),
                                            read_only=True)
        params = reader.restore_local(reader.latest_step())["params"]
        reader.close()
        return jax.device_get(params)
      return jax.device_get(jax.jit(init_fn)(teacher_params).params)
    _compression_report(config, workdir, plan, state, eval_metrics, log, dense_params,
                        setup.model_cfg, act)
  summary = dict(step=step, parameters=n_params, wall_s=time.perf_counter() - t_start,
                 compile_s=compile_s, loop_s=loop_s, eval_s=eval_s,
                 steps_run=step - (resume_step or 0), checkpoint_dir=ckpt_path,
                 **{f"eval_{k}": v for k, v in eval_metrics.items()})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  log("=" * 72)
  log(f"done: {step} steps in {summary['wall_s']:.1f} s (compile {compile_s:.1f} s), "
      f"{n_params:,} parameters")
  if eval_metrics:
    log(f"final eval: accuracy {eval_metrics['accuracy']:.4f}, loss "
        f"{eval_metrics['loss']:.4f} on {int(eval_metrics['examples'])} examples")
  log(f"checkpoints: {ckpt_path}\nmetrics: {os.path.join(workdir, 'metrics.jsonl')} and "
      f"{os.path.join(workdir, 'tensorboard')}")
  log("=" * 72)
  return summary
