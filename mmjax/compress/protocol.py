"""The compression protocol: every method is one `Method`, a name and optional pure stages.

A method sees parameters as a flat dict `{path: array}` of the leaves its rule gave it
(paths like `image/block_00/mlp/fc1/kernel`, from any pytree: nested dicts, NNX state,
dataclasses) and keeps its state as a pytree. Each stage is a place in a training step:

  init(leaves, rng) -> state                 once, before training (or before PTQ)
  view(leaves, state) -> leaves              the weights the forward computes with; runs
                                             inside the gradient (fake-quant with a
                                             straight-through estimator)
  wrap(apply_fn, state, paths) -> apply_fn   what the forward does to activations (the
                                             inputs of the layers that consume `paths`)
  hooks: ((module regex, fn(output, state) -> output), ...)
                                             rewrite the outputs of the linen modules
                                             whose path matches, between modules (token
                                             pruning: sequence lengths may change; hooks.py)
  loss(fwd: Forward, state) -> (scalar, metrics)
                                             an extra loss term (distillation); its learned
                                             parts come from `init_params(fwd, rng)` and are
                                             ordinary trainable parameters, in `fwd.params`
  update(leaves, state, step) -> (leaves, state)
                                             after each optimizer step (`step` = steps
                                             taken) and once at step 0: ramps advance,
                                             masks are recomputed and applied
  calibrate(leaves, state, calib: Calibration) -> (leaves, state)
                                             from batches handed in: statistics (activation
                                             ranges) and, for post-training methods (GPTQ,
                                             SparseGPT, AWQ, ...), new weights
  describe(leaves, state) -> {path: info}    what each leaf became, for the report and the
                                             export: `mask`, `n_m`, `codes` (+ `bits`,
                                             `scale_axes`, `clip_ratio`), `act_scale`,
                                             `act_bits`, or `bytes` that a method states for
                                             a storage format mmjax does not know
  check(shapes) -> None                      {path: shape} -> ValueError, before anything runs
  accepts(path, leaf) -> None | reason       which matched leaves the method can compress
                                             (`leaf`: a jax.ShapeDtypeStruct); the others
                                             are left as they are, said once in a warning
                                             and in `describe` ("skipped": reason)

Trainable factors in the forward (low-rank factors, adapters, learned step sizes): a
method with `trains=True` keeps a dict state whose `"trainable"` entry (any pytree) the
run's optimizer trains with the model, under the same schedule and clipping; its `view`,
`wrap`, `loss`, `update` and `describe` read it from the state like any other entry. In
the train step that entry lives in the optimized tree (`TrainState.aux`, `Plan.split`)
and is merged back into the state (`Plan.merge`) wherever the state is read.

A view that adds to the compressed weights rather than replacing them (LoRA adapters on a
quantized base: view = earlier view + a @ b) sets `adds=True`: it may share its paths with
one earlier view method (the plan composes views in order), never with a later one.

Constraints on the master weights (pruning masks) live in `update` alone: the weights are
masked at step 0 and after every optimizer step, so the mask costs one elementwise pass
fused into the optimizer's update, and `view` is for weights that differ from the master
copy (fake-quant).

Methods are bound to parameter paths by `rules` (binding.py) and composed by `Plan`
(core.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

STAGES = ("init", "view", "wrap", "loss", "update", "calibrate", "describe", "hooks")
TRAINABLE = "trainable"  # the state entry a `trains=True` method's optimizer trains
EXCLUSIVE = ("view", "wrap", "update")  # one method per path for each of these


class Forward(NamedTuple):
  """What a `loss` stage sees: the model's outputs and intermediates on `batch`, this
  method's trainable parameters and its frozen inputs (a teacher's weights, say)."""
  outputs: Any
  intermediates: Any
  batch: Any
  params: Any = None
  frozen: Any = None


class Calibration(NamedTuple):
  """What a `calibrate` stage sees: the forward (`apply_fn(params, batch)`, wrapped by the
  methods before this one), the weights it computes with, the batches, this method's paths;
  the task's `loss(outputs, batch) -> scalar` and the model's `row_groups(apply_fn, params,
  batch) -> fn(path, row shape) -> modality id per row | None` where given
  (modality-balanced calibration reads them)."""
  apply_fn: Callable
  params: Any
  batches: Sequence
  paths: tuple
  loss: Optional[Callable] = None
  row_groups: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  init: Optional[Callable] = None
  view: Optional[Callable] = None
  wrap: Optional[Callable] = None
  loss: Optional[Callable] = None
  update: Optional[Callable] = None
  calibrate: Optional[Callable] = None
  describe: Optional[Callable] = None
  init_params: Optional[Callable] = None
  check: Optional[Callable] = None
  accepts: Optional[Callable] = None  # (path, ShapeDtypeStruct) -> None | why not
  task_weight: float = 1.0  # the task loss is scaled by the product over methods
  trains: bool = False  # its state's "trainable" entry is trained by the run's optimizer
  hooks: Optional[tuple] = None  # ((module path regex, fn(output, state) -> output, or
  #   hooks.Around(fn(call: hooks.ModuleCall, state) -> output)), ...)
  adds: bool = False  # its view adds to the view of an earlier method on the same paths

  def __post_init__(self):
    if not any(getattr(self, s) is not None for s in STAGES if s != "init"):
      raise ValueError(f"compression method {self.name!r} defines none of the stages "
                       f"{', '.join(s for s in STAGES if s != 'init')}; give it at least one.")
    if self.trains and (self.init is None or self.init_params is not None):
      raise ValueError(f"compression method {self.name!r}: trains=True needs an init stage "
                       "whose state holds the trainable entry, and no init_params (its "
                       "trainable parameters are that entry).")

  def renamed(self, name: str) -> "Method":
    return dataclasses.replace(self, name=name)
