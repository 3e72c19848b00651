"""`config.compress` -> a compression `Plan` for the run's model family, and what the trainer
must hand it (frozen inputs such as a teacher, calibration batches), every error raised at
config time, before anything is compiled or written.

    config.compress.<section> = dict(method=<registered name>, <setting>=<value>, ...)
    config.compress.export = True      # write <workdir>/export at the end (compress_finish)
    config.calibration = dict(examples=128, seed=0)  # from the training split

Each method's settings, defaults and checks are its registered dataclass
(`mmjax/methods/`; the reference: docs/reference/config.md, `python -m mmjax.methods`).
Sections compose in stage order: pruning (the quantizer sees the masked weights), weight
quantization, post-training methods, activation quantization, loss terms (distillation).
Regexes match whole parameter paths such as `image/block_00/mlp/fc1/kernel`; a pattern of
None takes the family's default. This module is the harness's client of `mmjax.compress`:
it knows checkpoints (the teacher) and asks the family (`mmjax.harness.family`) what is
model-specific; it names no model, no parameter path and no method.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from mmjax import methods
from mmjax.compress import Plan
from mmjax.harness import checkpointing, family as family_lib
from mmjax.harness.family import Family

CALIBRATION_KEYS = {"examples", "seed"}


def _as_dict(c):
  return c.to_dict() if hasattr(c, "to_dict") else dict(c or {})


@dataclasses.dataclass(frozen=True)
class Frozen:
  """A frozen input of the step, restored from a checkpoint (a teacher's weights)."""
  name: str  # the method it is for
  label: str  # what to call it in the log
  checkpoint_dir: str
  abstract: Any  # its parameter tree as ShapeDtypeStructs


@dataclasses.dataclass(frozen=True)
class Compression:
  plan: Plan
  frozen: tuple = ()
  calibration: tuple = ()  # (examples, seed) when the plan calibrates
  export: bool = True
  settings: dict = dataclasses.field(default_factory=dict)  # recorded in the report


def calibration_of(config):
  c = _as_dict(config.get("calibration"))
  bad = sorted(set(c) - CALIBRATION_KEYS)
  if bad:
    raise ValueError(f"config.calibration has unknown field(s) {bad}; valid fields: "
                     f"{sorted(CALIBRATION_KEYS)}.")
  examples = c.get("examples", 128)
  if not isinstance(examples, int) or examples < 1:
    raise ValueError(f"config.calibration.examples={examples!r} must be a positive integer "
                     "(training examples the calibrating methods see; 128 is the default).")
  batch = int(config.data.batch_size)
  if examples % batch:
    raise ValueError(f"config.calibration.examples={examples} is not a multiple of "
                     f"config.data.batch_size={batch}; use {max(batch, examples // batch * batch)}"
                     " or change the batch size.")
  return examples, int(c.get("seed", 0))


def teacher_loader(config, read_checkpoints: bool = True):
  """-> teacher(teacher, teacher_model, where) -> (apply_fn, Frozen): a trained run restored
  as a frozen input; every check done here: the checkpoint exists and fits the teacher's
  model (unless `read_checkpoints` is False: shapes only, for lowering)."""
  def teacher_of(teacher, teacher_model, where):
    given = teacher
    if teacher == "init":  # self-distillation: the checkpoint the student starts from
      teacher = config.get("init") or ""
    if not teacher:
      raise ValueError(f"{where}.teacher is not set: give a trained run's workdir, or "
                       "'init' to distil from config.init (self-distillation).")
    run_dir = os.path.normpath(teacher)
    if os.path.basename(run_dir) == "checkpoints":  # a run's checkpoints dir
      run_dir = os.path.dirname(run_dir)
    module = config.get("model_module") or family_lib.DEFAULT_MODULE
    path = os.path.join(run_dir, "config.json")
    if teacher_model:  # the same family as the student, other arguments
      model_dict = teacher_model
    elif not read_checkpoints and not os.path.exists(path):
      model_dict = config.model  # shapes only, no run on disk: the student's model
    else:
      if not os.path.exists(path):
        raise ValueError(f"{where}.teacher={given}: no config.json there to read the "
                         f"teacher's model from; point at a run's workdir or set "
                         f"{where}.teacher_model.")
      with open(path) as f:
        run = json.load(f)
      model_dict, module = run["model"], run.get("model_module") or family_lib.DEFAULT_MODULE
    fam = family_lib.build(module, _as_dict(model_dict))
    ckpt_dir, abstract = checkpointing.checkpoint_dir(teacher), fam.abstract_params()
    if read_checkpoints:
      reader = checkpointing.Checkpointer(ckpt_dir, read_only=True)
      try:
        step = reader.latest_step()
        if step is None:
          raise ValueError(f"{where}.teacher={given} holds no checkpoint; point it at a "
                           "trained run's workdir.")
        reader.check_params_fit(step, abstract, what=f"the teacher ({where}.teacher): "
                                "params in")
      finally:
        reader.close()
    return fam.apply, Frozen("", "teacher", ckpt_dir, abstract)
  return teacher_of


def build(config, fam: Family, shapes: dict | None = None,
          read_checkpoints: bool = True) -> Compression:
  """config.compress -> Compression (an empty plan when nothing is set) for the run's model
  family; `shapes`: its `param_shapes()`, when the caller has them."""
  c = _as_dict(config.get("compress"))
  shapes = shapes or fam.param_shapes()
  ctx = methods.Context(shapes, fam, teacher_loader(config, read_checkpoints))
  parts, frozen, settings = [], [], {}
  for section, entry, s, built in methods.build_sections(c, ctx):
    parts.append(built.part)
    frozen.extend(built.frozen)
    if built.record is not None:
      settings[section] = built.record
  plan = Plan(*parts).check(shapes)
  calibration = ()
  if plan.needs_calibration(list(shapes)):
    calibration = calibration_of(config)
    settings["calibration"] = dict(examples=calibration[0], seed=calibration[1])
  return Compression(plan, tuple(frozen), calibration, bool(c.get("export", True)), settings)
