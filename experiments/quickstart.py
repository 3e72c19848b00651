"""Quickstart: build a multimodal model and train it for a few steps on random inputs.

  ./launch.sh quickstart [--preset=small --steps=20 --batch_size=32]

Prints the parameter count, the loss at every step, the compile time and the median step
time. (The end-to-end demo on the offline dataset replaces this once the data and
compression pieces land.)
"""
from __future__ import annotations

import statistics
import time

from absl import app, flags, logging

_PRESET = flags.DEFINE_string("preset", "small", "model preset: tiny | small | base")
_STEPS = flags.DEFINE_integer("steps", 20, "training steps (>= 1)")
_BATCH = flags.DEFINE_integer("batch_size", 32, "examples per step (>= 1)")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (> 0)")
_SEED = flags.DEFINE_integer("seed", 0, "seed for parameters and inputs")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing off the console
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name, value, ok in (("--steps", _STEPS.value, _STEPS.value >= 1),
                          ("--batch_size", _BATCH.value, _BATCH.value >= 1),
                          ("--learning_rate", _LR.value, _LR.value > 0)):
    if not ok:
      raise app.UsageError(f"{name}={value} is invalid: it must be positive.")
  import jax
  import optax

  from mmjax.models import MultimodalModel, get_preset, random_inputs

  try:
    cfg = get_preset(_PRESET.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  model = MultimodalModel(cfg)
  batch = random_inputs(cfg, _BATCH.value, seed=_SEED.value)
  print(f"mmjax quickstart: preset={_PRESET.value!r}, modalities={list(cfg.modalities)}, "
        f"fusion={cfg.fusion.kind}, batch={_BATCH.value}, backend={jax.default_backend()} "
        f"({jax.device_count()} device(s))")
  params = jax.jit(model.init)(jax.random.key(_SEED.value), batch)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  print(f"parameters: {n_params:,}")
  tx = optax.adamw(_LR.value)
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    logits, _ = model.apply(p, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  def train_step(p, o, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  t0 = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  print(f"compile: {time.perf_counter() - t0:.1f} s")
  times = []
  for i in range(_STEPS.value):
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch)
    loss = float(loss)
    times.append(time.perf_counter() - t0)
    print(f"step {i + 1:>3}/{_STEPS.value}  loss {loss:.4f}  {times[-1] * 1e3:.0f} ms",
          flush=True)
  med = statistics.median(times)
  print(f"median step time: {med * 1e3:.1f} ms ({_BATCH.value / med:.0f} examples/s); "
        f"loss on the (fixed, random-label) batch fell to {loss:.4f}")


if __name__ == "__main__":
  app.run(main)
