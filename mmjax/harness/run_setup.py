"""A run's setup: everything validated from its config before anything is compiled or
written (the trainer, `mmjax.cli.lowering` and the one-shot tools share it). Every error is a
ValueError naming the field, the bad value and what would be valid.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import jax

from mmjax.data import pipeline, sources
from mmjax.harness import checkpointing, compress_config, family as family_lib, optim, sharding
from mmjax.harness import task as task_lib
from mmjax.harness.family import Family
from mmjax.harness.task import Task


def model_inputs(batch: dict, fam: Family, task: Task) -> dict:
  """The keys a step reads: each of the model's inputs, its padding mask if the pipeline
  gave one, the task's labels and the example mask (analysis fields stay on the host)."""
  keep = (set(fam.modalities) | {f"{m}_mask" for m in fam.modalities}
          | set(task.label_keys) | {"example_mask"})
  return {k: v for k, v in batch.items() if k in keep}


def input_config(config, fam: Family) -> pipeline.InputConfig:
  d = config.data
  cfg = pipeline.InputConfig(
      dataset=d.dataset, data_dir=d.get("data_dir") or sources.default_data_dir(),
      batch_size=int(d.batch_size), seed=int(config.seed),
      modalities=tuple(sorted(fam.modalities)),
      text_len=int(d.get("text_len", 48)), audio_samples=int(d.get("audio_samples", 8000)),
      train_split=d.get("train_split") or "train", eval_split=d.get("eval_split") or "test",
      num_threads=int(d.get("num_threads", 2)), prefetch=int(d.get("prefetch", 4)),
      download=bool(d.get("download", False)), features=pipeline.feature_pairs(
          d.get("features")))
  if fam.preprocess is not None:
    cfg = dataclasses.replace(cfg, preprocess=dict(fam.preprocess(cfg)))
  return cfg


@dataclasses.dataclass
class Setup:
  """Everything validated from the config before anything is compiled or written."""
  family: Family
  task: Task
  input_cfg: pipeline.InputConfig
  mesh: Any
  total_steps: int
  compression: compress_config.Compression


def validate(config, plan=None, read_checkpoints: bool = True) -> Setup:
  """All config errors, raised before compilation and before the workdir is touched;
  `plan` replaces the plan config.compress builds (a method written in a notebook);
  `read_checkpoints=False`: shapes only, no teacher checkpoint read (`mmjax.cli.lowering`)."""
  fam = family_lib.from_config(config)
  task, input_cfg, t = task_lib.from_config(config, fam), input_config(config, fam), config.train
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
  check_labels(fam, input_cfg)
  check_init(config.get("init"), fam)
  shapes = fam.param_shapes()
  optim.check_trainable(config.optimizer, shapes)
  compression = compress_config.build(config, fam, shapes, read_checkpoints=read_checkpoints)
  if plan is not None:
    compression = dataclasses.replace(
        compression, plan=plan.check(shapes), calibration=compress_config.calibration_of(
            config) if plan.needs_calibration(list(shapes)) else ())
  if compression.calibration:
    check_calibration_size(compression.calibration[0], input_cfg)
  return Setup(fam, task, input_cfg, mesh, int(t.steps), compression)


def check_labels(fam: Family, input_cfg) -> None:
  """The model's classes (Family.labels: a head's size, zero-shot class names) against
  the dataset's label classes, when the dataset names them (a TFDS ClassLabel)."""
  if fam.labels is None:
    return
  label = pipeline.adapter_of(input_cfg).label
  names = sources.label_names(input_cfg.dataset, input_cfg.data_dir, label) if label else None
  if names is not None and len(names) != len(fam.labels):
    raise ValueError(
        f"the model has {len(fam.labels)} classes but {input_cfg.dataset}'s {label!r} has "
        f"{len(names)}; configure the model for {len(names)} (a head's size, or as many "
        "zero-shot class names, in label order; a pretrained head on other classes: "
        "new_head=True).")


def is_run(init: str, fam: Family) -> bool:
  """Is config.init an mmjax run (Orbax checkpoints), rather than a checkpoint for the
  family's own loader? A family without a loader only starts from runs."""
  path = os.path.normpath(init)
  return (fam.load is None or os.path.isdir(os.path.join(path, "checkpoints"))
          or os.path.basename(path) == "checkpoints")


def check_init(init, fam: Family):
  """config.init: an mmjax run (its checkpoints are checked when the run starts), or a
  checkpoint the family's `load` reads (a pretrained model's file or directory)."""
  if init and not is_run(init, fam) and not os.path.exists(init):
    raise ValueError(f"config.init={init}: no such file or directory; give a run's workdir "
                     f"or a checkpoint that model family {fam.name!r} can load.")


def init_params(init, fam: Family, abstract):
  """(params, what to log) from config.init: a run's newest checkpoint, or the family's
  loader for a checkpoint mmjax did not write (every missing or mis-shaped key named)."""
  if is_run(init, fam):
    step = checkpointing.require_checkpoint(init, "config.init")
    return checkpointing.restore_params_from(init, abstract, step), f"{init} (step {step})"
  params = fam.load(init, abstract)
  why = checkpointing.describe_mismatch(params, abstract, f"config.init={init}")
  if why:
    raise ValueError(why)
  return params, f"{init} ({fam.name}'s loader)"


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
    n = len(sources.open_split(input_cfg.dataset, input_cfg.train_split, input_cfg.data_dir,
                               download=input_cfg.download))
  if examples > n:
    raise ValueError(f"config.calibration.examples={examples} exceeds the {n} examples of "
                     f"{input_cfg.dataset}'s {input_cfg.train_split} split; use at most {n}.")


