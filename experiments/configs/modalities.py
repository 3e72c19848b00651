"""Modality-subset baselines: the dense `small` model fed only some of the modalities.

mm_arith needs all three (the text names the operation, the image and the audio carry
the operands), so these measure how much each modality carries: every single modality and
the text pairs should stay near chance (10%), image+audio near its ceiling (60%: the
digits without the operation).

Argument: `use=<modalities joined by +>` (required; e.g. `use=image+audio`), `tiny`.
Trained from scratch for 2,000 steps (by then the dense recipe is at ~98%):
  ./launch.sh train --config=experiments/configs/modalities.py:use=image+audio \
      --workdir=workdirs/only_image_audio
"""
from experiments.configs.common import base_config, parse_arg

MODALITIES = ("text", "image", "audio")


def get_config(arg=None):
  args = parse_arg(arg, values={"use": str})
  if "use" not in args:
    raise ValueError("modalities.py needs use=<modalities joined by +>, e.g. "
                     "--config=experiments/configs/modalities.py:use=image+audio "
                     f"(modalities: {', '.join(MODALITIES)}).")
  use = tuple(m for m in args["use"].split("+") if m)
  bad = [m for m in use if m not in MODALITIES]
  if bad or not use or len(set(use)) != len(use) or len(use) == len(MODALITIES):
    raise ValueError(f"use={args['use']!r} is not a proper subset of {'+'.join(MODALITIES)} "
                     "(one or two distinct modalities joined by +; all three is dense.py).")
  c = base_config(tiny=bool(args.get("tiny")), modalities=use)
  if not args.get("tiny"):
    c.train.steps = 2000
  return c
