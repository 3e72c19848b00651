"""An experiment config for the toy model and task outside the package (tests/toy_family.py,
tests/toy_task.py), run with tests/ on PYTHONPATH:

  PYTHONPATH=tests python -m experiments.main --config=tests/toy_config.py \
      --workdir=/tmp/toy [--config.data.data_dir=...]

Arguments: `gptq` (one-shot GPTQ w4 of the family's default kernels, from config.init),
`int8` (int8 weights and activations fine-tuned, from config.init).
"""
from experiments.configs.common import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, valid=("gptq", "int8"))
  c = base_config(tiny=True, modalities=("image",))
  c.model_module, c.task_module = "toy_family", "toy_task"
  c.model = dict(width=32, blocks=2, patch=7, classes=10, dropout=0.1)
  c.task = dict(k=3, smoothing=0.1)
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = 20, 20, 10
  if args.get("gptq"):
    c.train.steps = 0
    c.compress.post_training = dict(method="gptq", bits=4, granularity="channel",
                                    mode="sequential")
    c.calibration.examples = 32
  if args.get("int8"):
    c.train.steps = 10
    c.compress.quant = dict(bits=8)
    c.compress.activations = dict(bits=8, mode="int8")
    c.calibration.examples = 32
  return c
