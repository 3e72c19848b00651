"""The compression methods a config can select (`config.compress.<section>.method`): one
file per family of methods, each registering its settings dataclasses (registry.py). A new
method is a file here (or anywhere) plus its import line below."""
from mmjax.methods import registry  # noqa: F401
from mmjax.methods import distillation, post_training, pruning, quantization  # noqa: F401
from mmjax.methods.registry import REGISTRY, Context, build_sections, defaults  # noqa: F401
