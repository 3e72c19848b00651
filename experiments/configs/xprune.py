"""Cross-modal token pruning on the dense baseline: after fusion layer 0, the image and
audio tokens the text's cross-attention rates lowest are dropped, keeping `keep` of each
(mmjax/compress/token_prune.py). `steps=0` evaluates the dense checkpoint pruned;
otherwise a short fine-tune with the pruning in the forward.

Arguments: `keep=<fraction>` (default 0.3), `steps=<fine-tune steps>` (default 300),
`layer=<fusion layer>` (default 0), `block=<tower block>` (prune in the image and audio
towers after that block instead, ranked through fusion layer `layer`), `tiny`.
Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/xprune.py:keep=0.3 --workdir=workdirs/xprune30
"""
from experiments.configs.common import finetune_config, parse_arg, section


def get_config(arg=None):
  args = parse_arg(arg, valid=("tiny",), values={"keep": float, "steps": int,
                                                         "layer": int, "block": int})
  c = finetune_config(args, steps=args.get("steps", 300))
  if args.get("steps") == 0:
    c.train.steps = 0
  c.compress.tokens = section("xprune", keep=args.get("keep", 0.3), layer=args.get("layer", 0),
                              block=args.get("block"))
  return c
