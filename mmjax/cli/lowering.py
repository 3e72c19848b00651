"""Does an experiment's program compile for GPU and TPU? Checked on any machine: the train
and eval steps of a config are lowered with `jax.export` for platforms this machine need
not have (StableHLO; nothing runs, nothing is compiled by a backend).

  python -m mmjax.cli.lowering --config=experiments/configs/qat.py:tiny,int8 \
      [--platforms=cuda,tpu] [--config.init=<a dense run>]

Everything is abstract (shapes and dtypes): no dataset, no checkpoint is read (a config
whose compression needs a teacher takes its shapes from the teacher's config). Each
(program, platform) is lowered on its own so a failure names both. What is deliberately
platform-specific is chosen where the program is lowered (`lax.platform_dependent`: the
int8 backward's CPU-only gather becomes a plain transpose for cuda and tpu).
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from mmjax.compress.artifact import check_platforms
from mmjax.harness import train


def abstract_programs(config) -> dict:
  """{name: (fn, abstract args)} for a config: its train step and eval step."""
  config.mesh.data = 1
  setup = train.validate(config, read_checkpoints=False)
  fam, comp = setup.family, setup.compression
  progs = train.programs(config, setup)
  frozen = {f.name: f.abstract for f in comp.frozen}
  state = jax.eval_shape(progs.init_fn, jax.eval_shape(progs.fresh), frozen)
  n = setup.input_cfg.batch_size
  batch = jax.eval_shape(lambda: train.model_inputs(
      {**fam.example_batch(n, setup.input_cfg), "example_mask": jnp.ones((n,), bool)},
      fam, setup.task))
  return {"train_step": (progs.steps.train_step, (state, batch, frozen)),
          "eval_step": (progs.steps.eval_step, (state.params, state.cstate, batch, state.aux))}


# Pallas GPU kernels lower to Triton custom calls, which jax.export refuses by default: it
# guarantees no compatibility for them across jax versions. Lowering them proves the
# program compiles for GPU; an artifact meant to outlive the jax version should not carry
# them (mmjax's deploy artifacts use no Pallas kernel).
_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def lower(fn, args, platform: str):
  """`fn(*args)` lowered for `platform` (jax.export); -> the Exported."""
  return jax.export.export(jax.jit(fn), platforms=[platform],
                           disabled_checks=[_TRITON])(*args)


def check(config, platforms=("cuda", "tpu"), log=print) -> dict:
  """{(program, platform): None if it lowered, else the error} for a config."""
  platforms = check_platforms(platforms)
  out = {}
  for name, (fn, args) in abstract_programs(config).items():
    for platform in platforms:
      t0 = time.perf_counter()
      try:
        lower(fn, args, platform)
        out[name, platform] = None
        log(f"[lowering] {name} for {platform}: ok ({time.perf_counter() - t0:.1f} s)")
      except Exception as e:  # noqa: BLE001 (reported, not swallowed: the exit code says)
        out[name, platform] = f"{type(e).__name__}: {e}".splitlines()[0]
        log(f"[lowering] {name} for {platform}: FAILED {out[name, platform]}")
  return out


def main(argv, config, platforms):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  try:
    res = check(config, platforms)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  failed = [k for k, v in res.items() if v is not None]
  print(f"[lowering] {len(res) - len(failed)} of {len(res)} lowered")
  return 1 if failed else 0


if __name__ == "__main__":
  # flags only here: importing this module defines none (experiments.main owns --config)
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:args]",
                                            lock_config=False)
  _PLATFORMS = flags.DEFINE_list("platforms", ["cuda", "tpu"], "cuda, rocm, tpu, cpu")
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: main(argv, _CONFIG.value, _PLATFORMS.value))
