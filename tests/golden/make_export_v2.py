"""Writes tests/golden/export_v2/: an export in mmjax's format v2 (before typed storage),
and export_v2_expected.npz, the float view and activation scales that format's reader
gave. Made once at commit f160d30 (the last writer of v2); later code cannot run it (the
v2 writer is gone): it records how the fixture was made. tests/test_export_convert.py
checks that today's reader refuses v2 with the conversion command, and that the converted
export loads to the same values.

  git worktree add /tmp/v2 f160d30 && cd /tmp/v2 && python /path/to/make_export_v2.py <out>
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.compress import Plan, activations, export, formats, pruning, quant, rules
from mmjax.compress.core import flatten
from mmjax.compress.post_training import rtn


def main(out):
  rng = np.random.default_rng(0)
  params = {
      "qat4": {"kernel": rng.normal(size=(16, 8)).astype(np.float32)},
      "qat8": {"kernel": rng.normal(size=(8, 6)).astype(np.float32)},
      "conv": {"kernel": rng.normal(size=(3, 3, 4, 6)).astype(np.float32)},
      "pruned": {"kernel": rng.normal(size=(16, 8)).astype(np.float32)},
      "grid": {"kernel": rng.normal(size=(32, 8)).astype(np.float32)},
      "bias": rng.normal(size=(8,)).astype(np.float32),
  }
  params = jax.tree_util.tree_map(jnp.asarray, params)
  plan = Plan(
      rules([(r"pruned/kernel", pruning.unstructured(0.5, name="prune"))]),
      rules([(r"qat4/kernel", quant.weights(4, name="q4")),
             (r"(qat8|pruned)/kernel", quant.weights(8, name="q8")),
             (r"conv/kernel", quant.weights(3, name="q3"))]),
      rules([(r"grid/kernel", rtn.method(formats.grid("int", 4, granularity="group",
                                                      group_size=16)))]),
      rules([(r"qat8/kernel", activations.inputs(8, name="act"))]))

  def apply_fn(p, x):
    return x @ p["qat8"]["kernel"]

  params, cstate = plan.start(params, jax.random.PRNGKey(0))
  batches = [jnp.asarray(rng.normal(size=(4, 8)).astype(np.float32)) for _ in range(2)]
  params, cstate = plan.calibrate(apply_fn, params, cstate, batches)
  d = os.path.join(out, "export_v2")
  export.export(params, d, plan, cstate)
  view = flatten(export.load(d))
  scales, bits, mode = export.load_activation_scales(d)
  np.savez(os.path.join(out, "export_v2_expected.npz"),
           **{f"view:{p}": np.asarray(v) for p, v in view.items()},
           **{f"act:{p}": np.asarray(s) for p, s in scales.items()})
  print(sorted(view), scales, bits, mode)


if __name__ == "__main__":
  main(sys.argv[1])
