"""The calibration-based methods on the pretrained families (their golden random weights,
tests/golden/): on every kernel the family compresses by default and its conv stem, each
on the inputs sequential calibration solved it from (every earlier level compressed), with
LayerNorm scales spread as a trained model's, in float64, GPTQ's output error ||XW - XŴ||² is below round-to-nearest's on the same
3-bit grid and SparseGPT's below magnitude pruning's at 50%, and no Hessian XᵀX is zero
(a GPTQ whose Hessians are zero is round-to-nearest, silently)."""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import Plan, flatten, formats, intercept, layout, rules, unflatten
from mmjax.compress.post_training import gptq, passes, sparsegpt, stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_pretrained_bert  # noqa: E402  (each family's golden configuration)
import test_pretrained_clip  # noqa: E402
import test_pretrained_siglip  # noqa: E402
import test_pretrained_vit  # noqa: E402
import test_pretrained_whisper  # noqa: E402
from mmjax.pretrained import bert, clip, siglip, vit, whisper  # noqa: E402

G3 = formats.grid("int", 3, granularity="channel")
FAMILIES = {"vit": (vit, test_pretrained_vit._args, "image_stem|stem"),
            "clip": (clip, test_pretrained_clip._args, "image_stem"),
            "siglip": (siglip, test_pretrained_siglip._args, "image_stem"),
            "whisper": (whisper, test_pretrained_whisper._args, "conv1|conv2"),
            "bert": (bert, test_pretrained_bert._args, None)}


def _family(name):
  module, args, stem = FAMILIES[name]
  fam = module.family(args())
  params = fam.load(os.path.join(os.path.dirname(test_pretrained_vit.GOLDEN), name,
                                 "model.safetensors"), fam.abstract_params())
  # Features as a trained model's: its LayerNorm scales spread over orders of magnitude
  # (log-normal), so inputs are far from isotropic. With isotropic inputs (XᵀX ∝ I, as
  # random initial weights give) magnitude pruning already minimizes the output error and
  # nothing can beat it; GPTQ and SparseGPT gain from the correlations real inputs have.
  rng = np.random.default_rng(0)
  params = unflatten({p: (w * np.exp(rng.normal(size=w.shape)).astype(np.float32)
                          if p.endswith("scale") and w.ndim == 1 else w)
                      for p, w in flatten(params).items()}, params)
  kernels = rf"{fam.patterns['matmul']}" + (rf"|({stem})/kernel" if stem else "")
  batches = [fam.example_batch(4, seed=s, with_labels=False) for s in range(3)]
  return fam, params, kernels, batches, stem


def _matrix(w):
  return np.asarray(layout.to_matrix(jnp.asarray(w), layout.contract_axes(None, "", w.ndim)),
                    np.float64)


def _rtn(w):
  m = jnp.asarray(w, jnp.float32)
  return np.asarray(G3.round_matrix(m, *G3.fit(m)), np.float64)


def _magnitude(w, sparsity=0.5):
  cut = np.argsort(np.abs(w).reshape(-1), kind="stable")[:int(round(sparsity * w.size))]
  out = w.reshape(-1).copy()
  out[cut] = 0
  return out.reshape(w.shape)


def _per_layer(apply, params, solved, batches, paths, baseline):
  dense, new = flatten(params), flatten(solved)
  _, levels = passes.solve_order(apply, params, batches[0], paths)
  observe = intercept.observe(apply, paths, lambda d: stats.rows(
      d, layout.contract_axes(None, d.path, d.w.ndim)), convs=True)
  f = jax.jit(lambda p, b: {k: jnp.concatenate(v) for k, v in observe(p, b).items()})
  out, before = {}, set()
  for level in levels:
    view = unflatten({p: (new[p] if p in before else a) for p, a in dense.items()}, params)
    xs = [f(view, b) for b in batches]
    for p in level:
      x = np.concatenate([np.asarray(x[p], np.float64) for x in xs])
      w = _matrix(dense[p])
      err = lambda w_hat: float(np.sum((x @ (w - w_hat)) ** 2))
      out[p] = (err(_matrix(new[p])), err(baseline(w)), float(np.abs(x.T @ x).max()))
    before |= set(level)
  return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gptq_and_sparsegpt_beat_their_baselines_on_every_layer(name):
  fam, params, kernels, batches, stem = _family(name)
  paths = sorted(p for p in flatten(params) if re.fullmatch(kernels, p))
  assert len(paths) >= 12
  assert stem is None or any(re.fullmatch(rf"({stem})/kernel", p) for p in paths)
  for method, baseline in ((gptq.method(G3), _rtn), (sparsegpt.method(0.5), _magnitude)):
    plan = Plan(rules([(kernels, method)]))
    p0, cs = plan.start(params, jax.random.PRNGKey(0))
    solved, _ = plan.calibrate(fam.apply, p0, cs, batches)
    errs = _per_layer(fam.apply, params, solved, batches, paths, baseline)
    assert sorted(errs) == paths
    worse = sorted(p for p, (e, b, _) in errs.items() if not e < b)
    assert not worse, (method.name, worse)
    assert all(h > 0 for _, _, h in errs.values())
