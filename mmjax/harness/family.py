"""A model family: everything the harness needs from a model, provided by a module the
config names, so that the trainer, calibration, sensitivity, deploy and lowering know no
model (big_vision's trainer imports `models.<config.model_name>` the same way).

    config.model_module = "mmjax.models.family"      # the default; or "my_lab.models.foo"
    config.model = dict(...)                         # that module's arguments

A model module defines `family(args: dict) -> Family`, validating `args` (config errors
are raised there, before anything is compiled). mmjax's own multimodal models are one such
module (`mmjax/models/family.py`); `tests/toy_family.py` is a small one outside the
package, run through every experiment entry point by `tests/test_any_model.py`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional

import jax

DEFAULT_MODULE = "mmjax.models.family"
PATTERN_KINDS = ("matmul", "weights", "activations")


@dataclasses.dataclass(frozen=True)
class Family:
  """One model of a family, built from its arguments.

  init(rng, batch) -> params                      the parameter tree (no "params" wrapper)
  apply(params, batch, rng=None) -> (outputs, intermediates)
                                                  rng: dropout's, None in evaluation
  example_batch(batch_size, data=None, seed=0, with_labels=True) -> {key: np.ndarray}
                                                  inputs of the right shapes (and labels):
                                                  init, lowering and artifacts trace them;
                                                  `data` is the run's InputConfig (lengths)
  modalities                                      the batch keys it reads (each with its
                                                  optional `<key>_mask`); the input
                                                  pipeline feeds exactly these
  patterns                                        what its family compresses by default:
                                                  {"matmul": the projections of attention
                                                  and MLPs (pruning, post-training), "weights":
                                                  what weight quantization takes, "activations":
                                                  the layers whose inputs get quantized}
  labels                                          names of the output classes (artifacts)
  output_mask                                     per-token outputs: the batch key that
                                                  says which tokens are real (the task's
                                                  default weighting); None: all count
  load(path, abstract_params) -> params           a checkpoint mmjax did not write (a
                                                  file or directory given as config.init);
                                                  None: only mmjax runs
  structured_units(unit) -> (pattern, layout)     heads / MLP units for structured pruning
                                                  (`mmjax.compress.structured`); None: none
  shrink(view_params, describe, out_dir) -> dict  write the physically smaller model after
                                                  structured pruning; None: not offered
  unit_types                                      {name: regex}: groups of kernels that
                                                  sensitivity measures together
  row_groups(apply_fn, params, batch) -> fn(path, row shape) -> modality id per row | None
                                                  which modality each token of a layer's
                                                  input is (modality-balanced calibration,
                                                  `balance="modality"`), read off
                                                  apply_fn, the calibration's forward (its
                                                  hooks may merge or prune tokens); None:
                                                  not known
  preprocess(data) -> {modality: fn(raw) -> {key: array}}
                                                  the family's own input preprocessing
                                                  (a pretrained model's resize and
                                                  normalization, its tokenizer), given
                                                  the run's InputConfig; None: mmjax's
                                                  generic one (mmjax/data/adapters.py)
  """
  name: str
  init: Callable
  apply: Callable
  example_batch: Callable
  modalities: tuple
  patterns: Mapping[str, str]
  labels: Optional[tuple] = None
  output_mask: Optional[str] = None
  load: Optional[Callable] = None
  structured_units: Optional[Callable] = None
  shrink: Optional[Callable] = None
  unit_types: Mapping[str, str] = dataclasses.field(default_factory=dict)
  preprocess: Optional[Callable] = None
  row_groups: Optional[Callable] = None
  args: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # as the config gave

  def abstract_params(self):
    """The parameter tree as ShapeDtypeStructs (traced, nothing allocated)."""
    return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), self.example_batch(1)))

  def param_shapes(self) -> dict:
    from mmjax.compress import flatten
    return {p: tuple(a.shape) for p, a in flatten(self.abstract_params()).items()}


def import_attr(module: str, attr: str, field: str, what: str, example: str):
  """`module.attr`, or a one-line error naming the config field, the module and the fix."""
  if not isinstance(module, str) or not module:
    raise ValueError(f"{field}={module!r} must name a Python module, e.g. {example}.")
  try:
    mod = importlib.import_module(module)
  except ImportError as e:
    raise ValueError(f"{field}={module!r} cannot be imported ({type(e).__name__}: {e}); "
                     f"give an importable module (on PYTHONPATH), e.g. {example}.") from None
  fn = getattr(mod, attr, None)
  if not callable(fn):
    raise ValueError(f"{field}={module!r} has no {attr}() function; a {what} module defines "
                     f"{attr}(args) (see mmjax/{'family' if attr == 'family' else 'task'}.py).")
  return fn


def _as_dict(c) -> dict:
  return c.to_dict() if hasattr(c, "to_dict") else dict(c or {})


DATASET_ARGS = ("<dataset:label_names>", "<dataset:num_classes>")


def from_config(config) -> Family:
  """The family a config names (`config.model_module`, default mmjax's multimodal models)
  built from `config.model`; every error is a one-line ValueError. A `config.model` value
  in DATASET_ARGS is the run's dataset's: its label classes' names (a zero-shot
  classifier's class names) or their number (a new head's size), read from the dataset's
  TFDS info where it is prepared, so that they are the names it was prepared with."""
  args = _as_dict(config.get("model"))
  asks = {k: v for k, v in args.items() if isinstance(v, str) and v.startswith("<dataset:")}
  if asks:
    args = {**args, **_dataset_args(asks, config)}
  return build(config.get("model_module") or DEFAULT_MODULE, args)


def _dataset_args(asks: dict, config) -> dict:
  from mmjax.data import pipeline, sources
  for k, v in asks.items():
    if v not in DATASET_ARGS:
      raise ValueError(f"config.model.{k}={v!r} is unknown; valid: {', '.join(DATASET_ARGS)}.")
  d = config.data
  cfg = pipeline.InputConfig(dataset=d.dataset, data_dir=d.get("data_dir") or
                             sources.default_data_dir(),
                             features=pipeline.feature_pairs(d.get("features")))
  label = pipeline.adapter_of(cfg).label
  names = sources.label_names(cfg.dataset, cfg.data_dir, label) if label else None
  if not names:
    raise ValueError(f"config.model.{next(iter(asks))} asks for {cfg.dataset}'s label classes, "
                     f"but it has no ClassLabel{f' {label!r}' if label else ''}; give them "
                     "explicitly.")
  return {k: list(names) if v == DATASET_ARGS[0] else len(names) for k, v in asks.items()}


def build(module: str, args) -> Family:
  make = import_attr(module, "family", "config.model_module", "model", DEFAULT_MODULE)
  fam = make(_as_dict(args))
  if not isinstance(fam, Family):
    raise ValueError(f"config.model_module={module!r}: family(args) returned "
                     f"{type(fam).__name__}, not an mmjax.harness.family.Family.")
  if not fam.modalities:
    raise ValueError(f"config.model_module={module!r}: its Family names no modalities (the "
                     "batch keys its forward reads); see mmjax/harness/family.py.")
  missing = sorted(set(PATTERN_KINDS) - set(fam.patterns))
  if missing:
    raise ValueError(f"config.model_module={module!r}: its Family.patterns lacks {missing} "
                     "(the paths its family compresses by default); see mmjax/harness/family.py.")
  return fam
