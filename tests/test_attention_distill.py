"""Cross-modal attention-map distillation: the maps the hooks record are the fusion's
cross-attention (float64 NumPy from the model's own parameters), a student equal to its
teacher has a zero map loss and its gradient reaches the fusion's query and key kernels
otherwise, and layers that cannot be paired are one line naming both."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import Forward, Plan, attention_maps, distill
from mmjax.compress.protocol import Method
from test_token_prune import reference_text_maps, tiny_model


def test_recorded_maps_are_the_fusion_attention_and_the_loss_trains_them():
  fam, batch, params = tiny_model(fusion_layers=2)
  plan = Plan(Method("maps", hooks=attention_maps.record_hooks()))
  apply = jax.jit(plan.wrap(fam.apply, {}, list(params)))
  _, inter = apply(params, batch)
  maps = inter["fusion"]["attention_maps"]
  assert sorted(maps) == [f"layer_0{i}/{m}" for i in (0, 1) for m in ("audio", "image", "text")]
  want = reference_text_maps(params, inter, fam.args["num_heads"])
  np.testing.assert_allclose(maps["layer_00/text"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(maps["layer_01/image"]).sum(-1), 1.0, rtol=1e-5)

  teacher = lambda p, b: fam.apply(p, b)
  d = distill.method(teacher, alpha=0.0, attention_weight=1.0)
  assert d.hooks and d.task_weight == 1.0
  dplan = Plan(d)
  student = dplan.wrap(fam.apply, {}, list(params))

  def loss(p):
    out, inter = student(p, batch)
    return d.loss(Forward(out, inter, batch, frozen=params), {})[0]
  assert float(jax.jit(loss)(params)) == pytest.approx(0.0, abs=1e-6)
  other = jax.tree.map(lambda a: a * 1.3, params)
  value, grads = jax.jit(jax.value_and_grad(loss))(other)
  assert float(value) > 1e-4
  g = grads["fusion"]["layer_00"]["text"]["cross_attn"]
  assert float(jnp.abs(g["query"]["kernel"]).max()) > 0
  assert float(jnp.abs(g["key"]["kernel"]).max()) > 0


def test_layers_pair_uniformly_or_fail_naming_both():
  s = {"layer_00/text": jnp.zeros((2, 3, 4))}
  t = {f"layer_0{i}/text": jnp.zeros((2, 3, 4)) for i in range(2)}
  assert attention_maps.pair(s, t) == {"layer_00/text": "layer_01/text"}
  s2 = {f"layer_0{i}/text": jnp.zeros((2, 3, 4)) for i in range(2)}
  t3 = {f"layer_0{i}/text": jnp.zeros((2, 3, 4)) for i in range(3)}
  with pytest.raises(ValueError, match=r"the student's fusion layers \['layer_00', 'layer_01'\]"
                     r" cannot be paired with the teacher's \['layer_00', 'layer_01', "
                     r"'layer_02'\]: the teacher's 3 layers are not a multiple of the "
                     r"student's 2"):
    attention_maps.pair(s2, t3)
  with pytest.raises(ValueError, match=r"map is \(2, 3, 5\) and the teacher's layer_01/text is "
                     r"\(2, 3, 4\) \(other token counts\)"):
    attention_maps.pair({"layer_00/text": jnp.zeros((2, 3, 5))}, t)
