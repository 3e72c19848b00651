"""The method registry (mmjax/methods/): a config section names a registered method, whose
settings dataclass is the one source of its keys, defaults, checks and reference docs; a
method written outside the package is one register away from a config; different methods
take different paths; a bad value keeps the method's own message."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from experiments.configs import common, dense, post_training
from mmjax.compress import Method, flatten, rules
from mmjax.harness import compress_config, family
from mmjax.methods import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(config):
  return compress_config.build(config, family.from_config(config), read_checkpoints=False)


def test_the_committed_reference_is_the_generated_one():
  with open(os.path.join(REPO, "docs", "reference", "config.md")) as f:
    committed = f.read()
  assert committed == registry.reference_markdown(), (
      "docs/reference/config.md is stale: python -m mmjax.cli.reference "
      "--out=docs/reference")
  for name in registry.REGISTRY:
    assert f"### `{name}`" in committed


def test_a_method_written_outside_the_package_is_one_register_away():
  @registry.register("test_grid", stage=registry.QUANTIZE, doc="weights on a fixed grid")
  @dataclasses.dataclass(frozen=True)
  class Grid(registry.Settings):
    step: float = registry.setting(0.25, "the grid's spacing")
    pattern: str = registry.setting(r".*/mlp/\w+/kernel", "which kernels")

    def check(self, where):
      if not self.step > 0:
        raise ValueError(f"{where}.step={self.step} must be > 0.")

    def build(self, ctx, where):
      view = lambda flat, state: {p: jax.numpy.round(w / self.step) * self.step
                                  for p, w in flat.items()}
      return rules([(self.pattern, Method("grid", view=view))], ctx.paths)

  try:
    c = dense.get_config("tiny")
    c.compress.mine = common.section("test_grid", step=0.5)
    comp = _plan(c)
    fam = family.from_config(c)
    params = jax.jit(fam.init)(jax.random.PRNGKey(0), fam.example_batch(1))
    cstate = comp.plan.init(params, jax.random.PRNGKey(0))
    view, before = flatten(jax.jit(comp.plan.view)(params, cstate)), flatten(params)
    mlp = [p for p in view if "/mlp/" in p and p.endswith("kernel")]
    assert mlp and all(np.allclose(np.asarray(view[p]) / 0.5, np.round(np.asarray(view[p]) / 0.5))
                       for p in mlp)
    other = [p for p in view if p not in mlp]
    assert all(np.array_equal(view[p], before[p]) for p in other)
    c.compress.mine.step = -1.0
    with pytest.raises(ValueError, match=r"config.compress.mine.step=-1.0 must be > 0"):
      _plan(c)
    assert "### `test_grid`" in registry.reference_markdown()
  finally:
    registry.REGISTRY.pop("test_grid")


def test_a_method_in_a_module_of_ones_own_is_named_module_colon_name():
  """`method='toy_method:binary'` imports tests/toy_method.py, whose register line runs."""
  import sys
  c = dense.get_config("tiny")
  c.compress.mine = dict(method="toy_method:binary")
  try:
    comp = _plan(c)
    fam = family.from_config(c)
    params = jax.jit(fam.init)(jax.random.PRNGKey(0), fam.example_batch(1))
    cstate = comp.plan.init(params, jax.random.PRNGKey(0))
    view, before = flatten(jax.jit(comp.plan.view)(params, cstate)), flatten(params)
    mlp = [p for p in view if "/mlp/" in p and p.endswith("kernel")]
    assert mlp
    for p in view:
      w = np.asarray(before[p], np.float64)
      want = (np.sign(w) * np.abs(w).mean(axis=0, keepdims=True) if p in mlp else w)
      np.testing.assert_allclose(np.asarray(view[p], np.float64), want, rtol=1e-6)
    c.compress.mine = dict(method="toy_method:ternary")
    with pytest.raises(ValueError, match=r"config.compress.mine.method='toy_method:ternary': "
                       r"'toy_method' registers no method 'ternary'"):
      _plan(c)
  finally:
    registry.REGISTRY.pop("binary", None)
    sys.modules.pop("toy_method", None)
  c.compress.mine = dict(method="no_lab.methods:binary")
  with pytest.raises(ValueError, match=r"cannot import 'no_lab.methods' .*PYTHONPATH"):
    _plan(c)


def test_different_methods_on_different_paths():
  """Unstructured 50% on the text tower, 2:4 on the image tower, from one config."""
  c = dense.get_config("tiny")
  c.compress.prune_text = common.section("magnitude", sparsity=0.5,
                                         pattern=r"text/.*/(attn|mlp)/\w+/kernel")
  c.compress.nm_image = common.section("n_m", pattern=r"image/.*/(attn|mlp)/\w+/kernel")
  comp = _plan(c)
  fam = family.from_config(c)
  params = jax.jit(fam.init)(jax.random.PRNGKey(0), fam.example_batch(1))
  params, _ = jax.jit(comp.plan.start)(params, jax.random.PRNGKey(0))
  flat = {p: np.asarray(w) for p, w in flatten(params).items()}
  text = [p for p in flat if p.startswith("text/") and "/kernel" in p and (
      "/attn/" in p or "/mlp/" in p)]
  image = [p for p in flat if p.startswith("image/") and "/kernel" in p and (
      "/attn/" in p or "/mlp/" in p)]
  assert text and image
  for p in text:
    assert (flat[p] == 0).mean() == pytest.approx(0.5, abs=1 / flat[p].size)
  for p in image:  # 2 of every 4 consecutive inputs kept, per output
    groups = flat[p].reshape(-1, 4, flat[p].shape[-1])
    assert ((groups != 0).sum(axis=1) <= 2).all() and (flat[p] == 0).mean() == 0.5
  untouched = [p for p in flat if p.startswith("audio/") and p.endswith("kernel")]
  assert untouched and all((flat[p] != 0).all() for p in untouched)


@pytest.mark.parametrize("section,message", [
    (dict(method="no_such"), r"config.compress.s.method='no_such' is not a registered "
     r"compression method; registered: .*gptq.*magnitude"),
    (dict(method="magnitude", bits=4), r"unknown field\(s\) \['bits'\] for method "
     r"'magnitude'; valid: \['pattern', 'ramp', 'rules', 'scope', 'sparsity'\]"),
    (dict(method="magnitude", scope="everywhere"), r"config.compress.s.scope='everywhere' is "
     r"unknown; valid: layer, global"),
    (dict(method="gptq", bits="four"), r"config.compress.s.bits='four' must be int"),
    (dict(method="n_m", n=4, m=2), r"N:M pruning needs integers 1 <= n < m, got n=4, m=2"),
    (dict(method="magnitude", ramp=dict(kind="cubic")), r"ramp.kind='cubic' is "
     r"unknown"),
    (dict(method="magnitude", ramp=dict(start=3)), r"ramp has unknown field\(s\) "
     r"\['start'\]"),
    (dict(sparsity=0.5), r"config.compress.s names no method; set config.compress.s.method"),
    (dict(method="gptq", bits=3, granularity="group", group_size=48), r"config.compress.s"),
])
def test_a_bad_section_is_one_line_naming_the_field(section, message):
  c = dense.get_config("tiny")
  c.compress.s = section
  with pytest.raises(ValueError, match=message):
    _plan(c)


def test_a_config_argument_keeps_its_parsers_message():
  with pytest.raises(ValueError, match=r"config argument nm='2-4' must look like 2:4\.$"):
    post_training.get_config("tiny,method=sparsegpt,nm=2-4")
  with pytest.raises(ValueError, match=r"config argument bits='x' is not a valid int\.$"):
    post_training.get_config("tiny,bits=x")


def test_config_helpers_write_every_setting_with_the_registered_default():
  for name in registry.REGISTRY:
    out = common.section(name)
    fields = {f.name for f in dataclasses.fields(registry.REGISTRY[name].settings)}
    assert set(out) == fields | {"method"}
  with pytest.raises(ValueError, match="method 'gptq' has no setting"):
    common.section("gptq", sparsity=0.5)
