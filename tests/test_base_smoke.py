"""The `base` preset (the reference model, ~350M parameters) trains on CPU: one Adam step
at its real widths, vocabulary and input sizes (224x224x3 images, 16 kHz audio, 32000-way
per-token head), two layers per tower and one fusion layer. Twelve layers compile the
same block twelve times (~4x this test's time for no new code path); that the full depth
builds, with its exact parameter count, is `test_models.test_parameter_count_matches_closed_form`."""
import dataclasses
import functools

import jax
import numpy as np
import optax

from mmjax.models import MultimodalModel, get_preset, random_inputs


def test_base_one_training_step_on_cpu():
  full = get_preset("base")
  cfg = get_preset("base", fusion=dataclasses.replace(full.fusion, num_layers=1),
                   towers={m: dataclasses.replace(t, num_layers=2)
                           for m, t in full.towers.items()})
  model = MultimodalModel(cfg)
  batch = random_inputs(cfg, 1, seed=0, text_len=16)
  params = jax.jit(model.init)(jax.random.key(0), batch)
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)

  def loss_fn(p):
    logits, _ = model.apply(p, batch)
    assert logits.shape == (1, 16, 32000)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))  # one copy of 350M params at a time
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  # one compiled program: the second step's loss is the loss after the first update
  probe = np.asarray(params["params"]["text"]["block_01"]["mlp"]["fc2"]["kernel"][:4, :4])
  params, opt_state, before = step(params, opt_state)
  moved = np.asarray(params["params"]["text"]["block_01"]["mlp"]["fc2"]["kernel"][:4, :4])
  assert not np.allclose(moved, probe)
  _, _, after = step(params, opt_state)
  before, after = float(before), float(after)
  assert np.isfinite(before) and np.isfinite(after)
  assert after < before, f"one Adam step should lower the loss on its own batch ({before} -> {after})"
