"""A model-agnostic compressed training step: init, train_step and eval_step, pure and
jit-able, for any `apply_fn` and optax transformation.

    steps = step.build(apply_fn, loss_fn, tx, plan)
    state = steps.init(params, rng, sample_batch, frozen)
    state, metrics = jax.jit(steps.train_step, donate_argnums=0)(state, batch, frozen)
    sums = jax.jit(steps.eval_step)(state.params, state.cstate, batch)

`apply_fn(params, batch) -> (outputs, intermediates)` (with `apply_rng=True`,
`apply_fn(params, batch, rng)`), `loss_fn(outputs, batch) -> (scalar, metrics)`,
`eval_fn(outputs, batch) -> {name: sum}`. One step, in order (every stage of the plan at
its place, `core`):
  1. view = plan.view(params, cstate); apply = plan.wrap(apply_fn, cstate)
  2. loss = task_weight * loss_fn(apply(view, batch)) + plan.loss(...)
  3. the optimizer updates (params, aux): aux holds the loss stages' trainable parameters
     (distillation projections) and the trainable entries of `trains=True` methods'
     states (factors, adapters, step sizes: `Plan.split`), under the same optimizer,
     schedule and clipping; the forward merges them back into the state
  4. params, cstate = plan.update(params, cstate, step + 1): masks re-applied
`frozen` ({method name: tree}, e.g. a teacher's weights) is an argument, never state.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from mmjax.compress.core import Forward, Plan, flatten


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # the model's master weights (masks already applied)
  aux: Any  # {method name: trainable tree}: the loss stages' parameters and the
  # trainable entries of trains=True methods (split out of cstate; {} when none)
  opt_state: Any  # over (params, aux)
  cstate: Any  # {method name: state}
  rng: jax.Array  # raw uint32[2] key; the step folds in the step number


class Steps(NamedTuple):
  init: Callable
  train_step: Callable
  eval_step: Callable
  forward: Callable  # (params, cstate, batch, rng=None, aux=None) -> (outputs,
  # intermediates), compressed; `aux`: the trainables split out of cstate, if they are


def build(apply_fn, loss_fn, tx, plan: Plan | None = None, *, eval_fn=None, lr_schedule=None,
          apply_rng: bool = False) -> Steps:
  plan = plan or Plan()

  def forward(params, cstate, batch, rng=None, aux=None):
    fn = (lambda p, b: apply_fn(p, b, rng)) if apply_rng else apply_fn
    cstate = plan.merge(cstate, aux)
    return plan.wrap(fn, cstate, flatten(params))(plan.view(params, cstate), batch)

  def init(params, rng, sample_batch, frozen=None, *, start=True):
    """-> TrainState: the plan's state (masks applied to `params` at step 0 unless
    `start=False`), the loss stages' parameters sized on `sample_batch`."""
    if start:
      params, cstate = plan.start(params, jax.random.fold_in(rng, 2))
    else:
      cstate = plan.init(params, jax.random.fold_in(rng, 2))
    trained, cstate = plan.split(cstate)
    aux = {}
    if any(m.init_params is not None for m in plan.methods()):
      # jitted: the state is traced, so activation scales not calibrated yet quantize with
      # the sample batch's own range (an eager forward would refuse them: `activations`)
      out, inter = jax.jit(forward)(params, cstate, sample_batch, rng, trained)
      aux = plan.init_params(Forward(out, inter, sample_batch), jax.random.fold_in(rng, 3),
                             frozen)
    aux = {**aux, **trained}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, aux=aux,
                      opt_state=tx.init((params, aux)), cstate=cstate, rng=rng)

  def train_step(state: TrainState, batch, frozen=None):
    rng = jax.random.fold_in(state.rng, state.step)  # fresh per step, same on resume

    def total_loss(trainable):
      params, aux = trainable
      out, inter = forward(params, state.cstate, batch, rng, aux)
      task, metrics = loss_fn(out, batch)
      extra, method_metrics = plan.loss(Forward(out, inter, batch), state.cstate, aux, frozen)
      total = plan.task_weight * task + extra
      if plan.has_loss:
        metrics = {**metrics, **method_metrics, "task_loss": task}
      return total, metrics

    trainable = (state.params, state.aux)
    (loss, metrics), grads = jax.value_and_grad(total_loss, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params, aux = optax.apply_updates(trainable, updates)
    params, cstate = plan.update(params, plan.merge(state.cstate, aux), state.step + 1)
    trained, cstate = plan.split(cstate)
    aux = {**aux, **trained}
    metrics = dict(loss=loss, **metrics, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params), update_norm=optax.global_norm(updates))
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return state.replace(step=state.step + 1, params=params, aux=aux, opt_state=opt_state,
                         cstate=cstate), metrics

  def eval_step(params, cstate, batch, aux=None):
    out, _ = forward(params, cstate, batch, aux=aux)
    return (eval_fn or (lambda o, b: loss_fn(o, b)[1]))(out, batch)

  return Steps(init, train_step, eval_step, forward)
