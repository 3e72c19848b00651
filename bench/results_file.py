"""Where every benchmark's JSON goes: one writer, so all of them create the folder and
format the file the same way."""
import json
import os


def write(path: str, result: dict, log=print) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  log(f"wrote {path}")
