"""python -m mmjax.methods [--out=docs/reference/config.md]: the config reference."""
import sys

from mmjax.methods import registry

if __name__ == "__main__":
  text = registry.reference_markdown()
  out = next((a.partition("=")[2] for a in sys.argv[1:] if a.startswith("--out=")), None)
  if out:
    with open(out, "w") as f:
      f.write(text)
  else:
    print(text)
