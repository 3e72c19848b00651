"""The `base` preset (the reference model, ~350M parameters) trains one step on CPU."""
import jax
import numpy as np
import optax

from mmjax.models import MultimodalModel, get_preset, random_inputs


def test_base_one_training_step_on_cpu():
  cfg = get_preset("base")
  model = MultimodalModel(cfg)
  batch = random_inputs(cfg, 1, seed=0, text_len=16)
  params = jax.jit(model.init)(jax.random.key(0), batch)
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)

  def loss_fn(p):
    logits, _ = model.apply(p, batch)
    assert logits.shape == (1, 16, 32000)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  @jax.jit

  @jax.jit
  def step(p, o):  # no donation: the test compares before and after
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  before = float(jax.jit(loss_fn)(params))
  probe = np.asarray(params["params"]["text"]["block_11"]["mlp"]["fc2"]["kernel"][:4, :4])
  params, opt_state, loss = step(params, opt_state)
  after = float(jax.jit(loss_fn)(params))
  assert np.isfinite(before) and np.isfinite(after)
  assert abs(float(loss) - before) < 1e-3 * before
  assert after < before, f"one Adam step should lower the loss on its own batch ({before} -> {after})"
  moved = np.asarray(params["params"]["text"]["block_11"]["mlp"]["fc2"]["kernel"][:4, :4])
  assert not np.allclose(moved, probe)
