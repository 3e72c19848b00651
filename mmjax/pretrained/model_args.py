"""A pretrained family's `config.model`: its defaults merged with what the config gives,
sizes from a named variant ("base", "B/16": explicit fields win), every field checked,
each problem one error naming the field. Shared by every family, so they say it alike."""
from __future__ import annotations

TOWER = ("width", "depth", "heads", "mlp_dim")


def merge(args: dict, defaults: dict, module: str) -> dict:
  bad = sorted(set(args) - set(defaults))
  if bad:
    raise ValueError(f"config.model has unknown field(s) {bad} for {module}; valid: "
                     f"{sorted(defaults)}.")
  return {**defaults, **args}


def variant(name, sizes: dict, valid: str, patched: bool):
  """-> (the sizes entry of `name`, its patch size or None). `patched`: names look like
  "B/16" (any patch size); `valid` lists examples for the error."""
  size, _, patch = str(name).partition("/") if patched else (str(name), "", "")
  if size not in sizes or (patched and not patch.isdigit()):
    raise ValueError(f"config.model.variant={name!r} is unknown; valid: {valid}"
                     f"{' (any patch size)' if patched else ''}, or None with the sizes "
                     "given.")
  return sizes[size], (int(patch) if patched else None)


def fill(a: dict, values: dict) -> None:
  """`values` into `a` where the config left them None (or empty)."""
  for k, v in values.items():
    if not a.get(k):
      a[k] = v


def require(a: dict, keys, example: str) -> None:
  missing = [k for k in keys if a.get(k) is None]
  if missing:
    raise ValueError(f"config.model: {', '.join(missing)} not set; name a variant (e.g. "
                     f"{example!r}) or give them.")


def check_tower(t, where: str) -> None:
  """A tower's sizes: all four given, the width split evenly into heads."""
  if not isinstance(t, dict) or sorted(t) != sorted(TOWER):
    raise ValueError(f"{where}={t!r} must be a dict of {', '.join(TOWER)}.")
  if t["width"] % t["heads"]:
    raise ValueError(f"{where}: width={t['width']} is not divisible by heads={t['heads']}.")


def check_patch(a: dict) -> None:
  if not a.get("patch") or a["image_size"] % a["patch"]:
    raise ValueError(f"config.model: image_size={a['image_size']} is not a multiple of "
                     f"patch={a['patch']}.")
