"""Every documented compression field of every experiment config can be set from the
command line (--config.compress.<section>.<field>=v), and lands with the field's type.

ml_collections only overrides fields the config has, and a field whose value is None has
no type to parse a flag into: these tests catch a config that leaves a field out or sets
it to a bare None. Parsing only: no model is built, nothing is compiled."""
import os

import pytest
from absl import flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method -> {setting: (flag value, parsed value)}; the parsed type is what the code expects.
# Each table must cover its method's registered settings exactly (mmjax/methods/): a setting
# added without a test value here fails test_every_setting_of_every_method_is_covered.
SCHEDULE = {
    "ramp.kind": ("polynomial", "polynomial"),
    "ramp.begin": ("3", 3),
    "ramp.end": ("40", 40),
    "ramp.every": ("2", 2),
    "ramp.power": ("2", 2.0),  # an int on the command line is still a float
    "ramp.initial": ("0.1", 0.1),
}
UNSTRUCTURED = {
    "method": ("random", "random"),
    "scope": ("global", "global"),
    "sparsity": ("0.75", 0.75),
    "pattern": (r"image/.*/kernel", r"image/.*/kernel"),
    "rules": ("(('image/.*/kernel', 0.9), ('text/.*/kernel', 0.5))",
              (("image/.*/kernel", 0.9), ("text/.*/kernel", 0.5))),
    **SCHEDULE,
}
UNITS = {"method": ("mlp_units", "mlp_units"), "sparsity": ("0.75", 0.75),
         "pattern": (r".*/mlp/.*", r".*/mlp/.*"), **SCHEDULE}
GRID = {
    "format": ("nf4", "nf4"),
    "bits": ("3", 3),
    "symmetric": ("false", False),
    "granularity": ("channel", "channel"),
    "group_size": ("64", 64),
    "ragged_groups": ("true", True),
}
METHODS = {
    "magnitude": UNSTRUCTURED,
    "random": {**UNSTRUCTURED, "method": ("magnitude", "magnitude")},
    "n_m": {"method": ("n_m", "n_m"), "n": ("1", 1), "m": ("8", 8),
            "pattern": (r"image/.*/kernel", r"image/.*/kernel"),
            "recompute_every": ("1", 1), **SCHEDULE},
    "heads": UNITS,
    "mlp_units": {**UNITS, "method": ("heads", "heads")},
    "fake_quant": {
        "bits": ("4", 4),
        "granularity": ("tensor", "tensor"),
        "clip_ratio": ("0.9", 0.9),
        "pattern": (r".*/kernel", r".*/kernel"),
    },
    "activations": {
        "bits": ("8", 8),
        "mode": ("int8", "int8"),
        "int8_grads": ("false", False),
        "format": ("fp8_e4m3", "fp8_e4m3"),
        "percentile": ("99.9", 99.9),
        "pattern": (r"text/.*/kernel", r"text/.*/kernel"),
    },
    "gptq": {
        "method": ("gptq", "gptq"), **GRID,
        "damp": ("0.1", 0.1),
        "block": ("64", 64),
        "act_order": ("true", True),
        "balance": ("modality", "modality"),
        "mode": ("parallel", "parallel"),
        "pattern": (r"image/.*/kernel", r"image/.*/kernel"),
        "rules": ("(('image/.*', {'bits': 3}),)", (("image/.*", {"bits": 3}),)),
    },
    "rtn": {"method": ("rtn", "rtn"), **GRID,
            "pattern": (r"image/.*/kernel", r"image/.*/kernel"),
            "rules": ("(('image/.*', {'bits': 3}),)", (("image/.*", {"bits": 3}),))},
    "lsq": {"bits": ("3", 3), "granularity": ("tensor", "tensor"),
            "pattern": (r".*/kernel", r".*/kernel")},
    "lowrank": {"rank": ("4", 4), "pattern": (r".*/mlp/\w+/kernel", r".*/mlp/\w+/kernel")},
    "lora": {"rank": ("2", 2), "alpha": ("4", 4.0),
             "pattern": (r".*/mlp/\w+/kernel", r".*/mlp/\w+/kernel")},
    "distill": {
        "teacher": ("/tmp/teacher_run", "/tmp/teacher_run"),
        "temperature": ("4", 4.0),
        "alpha": ("0.25", 0.25),
        "features": ("('pooled',)", ("pooled",)),
        "feature_weight": ("0.5", 0.5),
        "attention_weight": ("2", 2.0),
    },
    "tome": {"r": ("3", 3), "modalities": ("('image',)", ("image",)),
             "blocks": (r"image/block_\d+", r"image/block_\d+"), "keep_first": ("1", 1),
             "proportional": ("false", False)},
    "xprune": {"keep": ("0.5", 0.5), "queries": ("audio", "audio"),
               "modalities": ("('image',)", ("image",)), "layer": ("1", 1),
               "block": ("0", 0)},
}
EXPORT = {"": ("false", False)}
# not compression, but the same mechanism (typed placeholders for data_dir and init)
COMMON = {
    "seed": ("3", 3),
    "init": ("/tmp/dense_run", "/tmp/dense_run"),
    "data.data_dir": ("/tmp/tfds", "/tmp/tfds"),
    "optimizer.lr": ("1e-3", 1e-3),
    "train.steps": ("7", 7),
    "calibration.examples": ("256", 256),
    "calibration.seed": ("1", 1),
    "optimizer.trainable": ("head/.*", "head/.*"),
    "data.eval_split": ("validation", "validation"),
}


def _fields(prefix, table):
  return {f"{prefix}.{k}" if k else prefix: v for k, v in table.items()}


def _section(name, method):
  return _fields(f"compress.{name}", METHODS[method])


CASES = {
    "dense.py:tiny": {},
    "modalities.py:use=image+audio,tiny": {},
    "prune.py:tiny": {**_section("prune", "magnitude"), **_fields("compress.export", EXPORT)},
    "prune.py:tiny,oneshot": _section("prune", "magnitude"),
    "prune.py:tiny,random": _section("prune", "random"),
    "nm.py:tiny": _section("prune", "n_m"),
    "structured.py:tiny": _section("prune", "heads"),
    "structured.py:tiny,mlp": _section("prune", "mlp_units"),
    "qat.py:tiny": {**_section("quant", "fake_quant"), **_fields("compress.export", EXPORT)},
    "qat.py:tiny,lsq": {**_section("quant", "lsq"), **_fields("compress.export", EXPORT)},
    "qat.py:tiny,int8": {**_section("quant", "fake_quant"),
                         **_section("activations", "activations")},
    "ptq.py:tiny": {**_section("quant", "fake_quant"), **_section("activations", "activations")},
    "ptq.py:tiny,percentile=99.5": _section("activations", "activations"),
    "post_training.py:tiny": _section("post_training", "gptq"),
    "post_training.py:tiny,method=rtn,w8a8": {**_section("post_training", "rtn"),
                                              **_section("activations", "activations")},
    "prune_qat.py:tiny": {**_section("prune", "magnitude"), **_section("quant", "fake_quant")},
    "distill.py:tiny": {**_section("distill", "distill"), **_fields("compress.export", EXPORT)},
    f"pretrained.py:model=clip,checkpoint={REPO}/tests/golden/clip,tiny,method=gptq":
        _section("post_training", "gptq"),
    f"pretrained.py:model=vit,checkpoint={REPO}/tests/golden/vit,tiny,method=qat,steps=4": {
        **_section("quant", "fake_quant"), **_fields("compress.export", EXPORT)},
    "lowrank.py:tiny": {**_section("factorize", "lowrank"), **_fields("compress.export", EXPORT)},
    "post_training.py:tiny,method=gptq,bits=2,group=32,lora=4": {
        **_section("post_training", "gptq"), **_section("adapters", "lora"),
        **_section("distill", "distill")},
    "tome.py:tiny": {**_section("tokens", "tome"), **_fields("compress.export", EXPORT)},
    "xprune.py:tiny": {**_section("tokens", "xprune"), **_fields("compress.export", EXPORT)},
    "combined.py:tiny": {**_section("prune", "magnitude"), **_section("quant", "fake_quant"),
                         **_section("distill", "distill"), **_fields("compress.export", EXPORT)},
}


def test_every_setting_of_every_method_is_covered():
  """The tables above name every registered setting of the methods they test (a setting
  the configs cannot set by flag would go unnoticed otherwise)."""
  import dataclasses
  from mmjax.methods import REGISTRY, defaults
  for method, table in METHODS.items():
    want = set()
    for f in dataclasses.fields(REGISTRY[method].settings):
      d = defaults(method)[f.name]
      want |= ({f"{f.name}.{k}" for k in dataclasses.asdict(d)} if dataclasses.is_dataclass(d)
               else {f.name})
    have = set(table) - {"method"}
    assert have == want - {"teacher_model"}, (method, sorted(want ^ have))


def parse(config_arg, overrides=()):
  """The config as experiments/main.py would see it after these command-line flags."""
  argv = ["prog", f"--config={os.path.join(REPO, 'experiments', 'configs', config_arg)}",
          *overrides]
  values = flags.FlagValues()
  # sys_argv: the override flags are found in the argv, not only in what is parsed
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                           lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


def _get(config, dotted):
  for k in dotted.split("."):
    config = config[k]
  return config


def test_every_config_file_is_covered():
  names = {f for f in os.listdir(os.path.join(REPO, "experiments", "configs"))
           if f.endswith(".py") and f not in ("common.py", "__init__.py")}
  assert names == {c.split(":")[0] for c in CASES}
  from mmjax import methods
  tested = {m for m in METHODS}
  untested = sorted(set(methods.REGISTRY) - tested - {"awq", "sparsegpt", "wanda",
                                                       "smoothquant"})
  assert not untested, f"no config case sets these methods' fields by flag: {untested}"


@pytest.mark.parametrize("config_arg", sorted(CASES))
def test_documented_fields_are_settable_by_flag(config_arg):
  fields = {**_fields("", COMMON), **CASES[config_arg]}
  fields = {k.lstrip("."): v for k, v in fields.items()}
  config = parse(config_arg, [f"--config.{k}={flag}" for k, (flag, _) in fields.items()])
  for k, (_, want) in fields.items():
    got = _get(config, k)
    assert got == want and type(got) is type(want), f"--config.{k}: got {got!r}, want {want!r}"


def test_unset_percentile_is_none_and_a_float_once_set():
  # None means "clip at max|x|" downstream; the placeholder keeps it None until a flag sets it
  assert parse("ptq.py:tiny").compress.activations.percentile is None
  assert parse("ptq.py:tiny,percentile=99.5").compress.activations.percentile == 99.5
  assert parse("ptq.py:tiny").compress.activations.to_dict()["percentile"] is None


def test_teacher_model_is_settable_as_a_dict():
  config = parse("distill.py:tiny", ["--config.compress.distill.teacher_model="
                                     "{'d_model': 16, 'num_heads': 2}"])
  assert config.compress.distill.to_dict()["teacher_model"] == {"d_model": 16, "num_heads": 2}
  assert parse("distill.py:tiny").compress.distill.to_dict()["teacher_model"] is None


def test_a_bad_value_is_refused_at_parse_time():
  with pytest.raises(flags.IllegalFlagValueError, match="percentile"):
    parse("ptq.py:tiny", ["--config.compress.activations.percentile=high"])
