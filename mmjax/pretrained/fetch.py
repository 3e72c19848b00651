"""Download a checkpoint from the Hugging Face Hub, on request only: mmjax never downloads
implicitly (a config names a directory on disk), so getting one is this explicit command.

    python -m mmjax.pretrained.fetch --repo=openai/clip-vit-base-patch32 --out=/ckpt/clip-b32
    ./launch.sh train --config=experiments/configs/pretrained.py:model=clip_b32,checkpoint=/ckpt/clip-b32

Only the files mmjax reads are fetched: safetensors weights, config.json, the tokenizer's
files and preprocessor_config.json. Offline, or for a repository that does not exist or
holds no safetensors weights, it fails at once with one line saying so.
"""
from __future__ import annotations

import os
import sys

FILES = ["*.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "*.model", "vocab.txt",
         "vocab.json", "merges.txt"]


def fetch(repo: str, out: str, revision: str | None = None) -> str:
  """Download `repo`'s mmjax-readable files into `out`; -> `out`."""
  if not repo or repo.count("/") != 1:
    raise ValueError(f"--repo={repo!r} must name a Hub repository as owner/name, e.g. "
                     "openai/clip-vit-base-patch32.")
  from huggingface_hub import snapshot_download
  try:
    snapshot_download(repo_id=repo, revision=revision, local_dir=out, allow_patterns=FILES)
  except Exception as e:  # noqa: BLE001 (the Hub client raises many kinds; all mean the same)
    why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    raise ValueError(f"cannot download {repo} ({type(e).__name__}: {why}). Without a network, "
                     "copy a checkpoint directory onto this machine and give its path "
                     "instead.") from None
  weights = [f for f in os.listdir(out) if f.endswith(".safetensors")]
  if not weights:
    raise ValueError(f"{repo} has no .safetensors weights (only other formats); mmjax reads "
                     "safetensors: pick a repository or revision that has them.")
  return out


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repo", required=True, help="owner/name on the Hugging Face Hub")
  parser.add_argument("--out", required=True, help="the checkpoint directory to write")
  parser.add_argument("--revision", default=None, help="a branch, tag or commit")
  args = parser.parse_args(argv)
  try:
    path = fetch(args.repo, args.out, args.revision)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.repo} -> {path}: " + ", ".join(sorted(os.listdir(path))))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
