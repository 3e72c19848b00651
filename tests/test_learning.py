"""A real learning test: a tiny multimodal model overfits one small batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.models import MultimodalModel, get_preset, random_inputs


def test_tiny_model_overfits_one_multimodal_batch():
  cfg = get_preset("tiny")
  model = MultimodalModel(cfg)
  batch = random_inputs(cfg, 16, seed=0)  # random labels: only memorisation can fit them
  params = model.init(jax.random.key(0), batch)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss_fn(p):
    logits, _ = model.apply(p, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  @jax.jit
  def steps(params, opt_state):
    def one(carry, _):
      p, o = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), loss
    return jax.lax.scan(one, (params, opt_state), None, length=300)

  (params, _), losses = steps(params, opt_state)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses))
  first, last = losses[0], losses[-5:].mean()
  assert last <= 0.1 * first, f"loss fell only from {first:.3f} to {last:.3f}"
  logits, _ = model.apply(params, batch)
  assert float(jnp.mean(jnp.argmax(logits, -1) == batch["label"])) == 1.0
