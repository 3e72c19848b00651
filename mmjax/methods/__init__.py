"""The compression methods a config can select (`config.compress.<section>.method`): one
file per family of methods, each registering its settings dataclasses (registry.py). Every
module of this package is imported here, so a new method is one new file; a method in a
module of your own is selected as `method='my_lab.methods:name'` (registry.lookup)."""
import importlib
import pkgutil

from mmjax.methods import registry
from mmjax.methods.registry import REGISTRY, Context, build_sections, defaults  # noqa: F401

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
  if _m not in ("registry", "__main__"):
    importlib.import_module(f"{__name__}.{_m}")
