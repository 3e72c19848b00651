"""Token merging (ToMe) on the dense baseline: in every block of the image and audio
towers, r token pairs merge between attention and MLP, with proportional attention
(mmjax/compress/token_merge.py). No parameter changes: `steps=0` evaluates the dense
checkpoint with merging (ToMe's off-the-shelf setting); otherwise a short fine-tune.

Arguments: `r=<tokens per block>` (default 4), `steps=<fine-tune steps>` (default 300),
`towers=image+audio`, `tiny`. Reproduce (after the dense run):
  ./launch.sh train --config=experiments/configs/tome.py:r=4,steps=0 --workdir=workdirs/tome4
"""
from experiments.configs.common import finetune_config, parse_arg, section


def get_config(arg=None):
  args = parse_arg(arg, valid=("tiny",), values={"r": int, "steps": int, "towers": str})
  c = finetune_config(args, steps=args.get("steps", 300))
  if args.get("steps") == 0:
    c.train.steps = 0
  c.compress.tokens = section("tome", r=args.get("r", 1 if args.get("tiny") else 4),
                              modalities=tuple(args.get("towers", "image+audio").split("+")))
  return c
