"""A compression method outside the package, selected by a config as
`method='toy_method:binary'` (tests/test_methods_registry.py): the registry imports this
module, whose register line runs; no mmjax file names it."""
import dataclasses

import jax.numpy as jnp

from mmjax.compress import Method, rules
from mmjax.methods import registry


@registry.register("binary", stage=registry.QUANTIZE,
                   doc="1-bit weights: sign(w) times the mean |w| of each output channel")
@dataclasses.dataclass(frozen=True)
class Binary(registry.Settings):
  pattern: str = registry.setting(r".*/mlp/\w+/kernel", "which [in, out] kernels")

  def build(self, ctx, where):
    view = lambda flat, state: {
        p: jnp.sign(w) * jnp.mean(jnp.abs(w), axis=0, keepdims=True) for p, w in flat.items()}
    return rules([(self.pattern, Method("binary", view=view))], ctx.paths)
