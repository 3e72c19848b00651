"""The config-selectable compression methods: each registers a settings dataclass, the one
source of its config keys, defaults, validation and reference docs, whose `build` makes
the compression part (JaxPruner's `register_algorithm`, Qwix's contrib modules: adding a
method edits no central file).

    @register("magnitude", stage=PRUNE, doc="gradual magnitude pruning")
    @dataclasses.dataclass(frozen=True)
    class Magnitude(Settings):
      sparsity: float = setting(0.5, "fraction removed, in [0, 1)")
      def build(self, ctx, where): return rules([(self.pattern or ..., ...)], ctx.paths)

A config names methods by section: `config.compress.<section> = dict(method=<name>,
**settings)`; any number of sections, any names (`prune_text`, `nm_image`), so that
different methods take different paths. Parts compose in stage order (pruning, factorization,
weight quantization, post-training, adapters, activations, losses, token reduction), then
by section name. The sections
named `prune`, `quant`, `post_training`, `activations` and `distill` may omit `method`
(magnitude, fake_quant, gptq, activations, distill: the configs written before the
registry). A method in a module of your own is named `method='my_lab.methods:fisher'`:
the module is imported and its `@register` lines run; a file added to `mmjax/methods/` is
found without any import line. `python -m mmjax.methods` prints the reference
(docs/reference/config.md).
"""
from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from typing import Any, Callable, Mapping, Optional, Sequence

from mmjax.compress import Plan

PRUNE, FACTORIZE, QUANTIZE, POST_TRAINING, ADAPTERS, ACTIVATIONS, LOSS, TOKENS = range(8)
STAGE_NAMES = {PRUNE: "pruning", FACTORIZE: "factorization (trained factors)",
               QUANTIZE: "weight quantization",
               POST_TRAINING: "post-training (calibrated, one shot)",
               ADAPTERS: "adapters (trained, added to the compressed weights)",
               ACTIVATIONS: "activation quantization", LOSS: "loss terms",
               TOKENS: "token reduction (module hooks between blocks)"}
LEGACY_SECTIONS = {"prune": "magnitude", "quant": "fake_quant", "post_training": "gptq",
                   "activations": "activations", "distill": "distill"}
NOT_METHODS = ("export",)  # config.compress fields that are no method section


def setting(default, doc: str, *, choices: Sequence | None = None):
  """A settings field: its default, one line of docs, and its valid values if a few."""
  return dataclasses.field(default=default, metadata=dict(doc=doc, choices=choices))


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method's `build` may ask of the run: the parameter shapes, the model family's
  defaults (`pattern(kind)`, `structured_units`), and the harness's services (a teacher
  restored from a run)."""
  shapes: Mapping[str, tuple]
  family: Any
  teacher: Callable = None  # (teacher, teacher_model, where) -> (apply_fn, Frozen)

  @property
  def paths(self):
    return sorted(self.shapes)

  def pattern(self, given, kind: str) -> str:
    return given or self.family.patterns[kind]


@dataclasses.dataclass(frozen=True)
class Built:
  """A section's compression part, the frozen inputs it needs (a teacher) and what the
  report records of it."""
  part: Any
  frozen: tuple = ()
  record: Optional[dict] = None


class Settings:
  """Base of the settings dataclasses: `check(where)` raises a one-line ValueError about a
  bad value (beyond the types and choices checked for every field); `build(ctx, where)`
  returns the compression part (or a `Built`)."""

  def check(self, where: str):
    pass

  def build(self, ctx: Context, where: str):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  settings: type
  stage: int
  doc: str


REGISTRY: dict[str, Entry] = {}


def register(name: str, *, stage: int, doc: str):
  """Class decorator: `name` selects this settings dataclass in a config section."""
  def deco(cls):
    if name in REGISTRY and REGISTRY[name].settings is not cls:
      raise ValueError(f"compression method {name!r} is registered twice "
                       f"({REGISTRY[name].settings.__qualname__}, {cls.__qualname__}).")
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, Settings)):
      raise TypeError(f"{cls.__qualname__}: register a dataclass subclassing Settings.")
    REGISTRY[name] = Entry(name, cls, stage, doc)
    return cls
  return deco


def lookup(name, where: str) -> Entry:
  """A registered method; `"my_lab.methods:fisher"` first imports `my_lab.methods` (whose
  `@register` lines run), so a method outside mmjax needs no mmjax file edited."""
  if isinstance(name, str) and ":" in name and name not in REGISTRY:
    module, _, short = name.partition(":")
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(f"{where}.method={name!r}: cannot import {module!r} ({e}); put it on "
                       "PYTHONPATH or fix the module name.") from None
    if short not in REGISTRY:
      raise ValueError(f"{where}.method={name!r}: {module!r} registers no method {short!r}; "
                       f"registered: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[short]
  if name not in REGISTRY:
    raise ValueError(f"{where}.method={name!r} is not a registered compression method; "
                     f"registered: {', '.join(sorted(REGISTRY))} (a method in your own "
                     "module: method='my_lab.methods:name').")
  return REGISTRY[name]


def defaults(name: str) -> dict:
  """Every field of method `name` with its default (configs write them all out, so that
  a flag can override any of them)."""
  entry = lookup(name, "method")
  return {"method": name, **{f.name: f.default for f in dataclasses.fields(entry.settings)}}


# ---------------------------------------------------------------- values from a config

def _types(hint):
  """The Python types a field's annotation allows (None included for Optional)."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return tuple(t for a in typing.get_args(hint) for t in _types(a))
  if hint is type(None):
    return (type(None),)
  return (origin or hint,)


def _coerce(value, allowed, where):
  if value is None and type(None) in allowed:
    return None
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  for kind in allowed:  # a nested settings record (pruning's Ramp) from a dict
    if dataclasses.is_dataclass(kind):
      if isinstance(value, kind):
        return value
      if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(kind)}
        bad = sorted(set(value) - names)
        if bad:
          raise ValueError(f"{where} has unknown field(s) {bad}; valid: {sorted(names)}.")
        hints = typing.get_type_hints(kind)
        return kind(**{k: _coerce(v, _types(hints[k]), f"{where}.{k}")
                       for k, v in value.items()})
  if bool in allowed and isinstance(value, bool):
    return value
  if int in allowed and isinstance(value, int) and not isinstance(value, bool):
    return value
  if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if str in allowed and isinstance(value, str):
    return value
  if tuple in allowed and isinstance(value, (list, tuple)):
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)
  if dict in allowed and isinstance(value, Mapping):
    return dict(value)
  names = " or ".join(sorted({t.__name__ if t is not type(None) else "None" for t in allowed}))
  raise ValueError(f"{where}={value!r} must be {names}.")


def parse(section: str, values: Mapping, where: str | None = None):
  """A config section -> (Entry, settings), every key, type and choice checked."""
  where = where or f"config.compress.{section}"
  values = dict(values)
  name = values.pop("method", None) or LEGACY_SECTIONS.get(section)
  if name is None:
    raise ValueError(f"{where} names no method; set {where}.method to one of "
                     f"{', '.join(sorted(REGISTRY))}.")
  entry = lookup(name, where)
  fields = {f.name: f for f in dataclasses.fields(entry.settings)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"{where} has unknown field(s) {unknown} for method {name!r}; valid: "
                     f"{sorted(fields)} (python -m mmjax.methods lists every method's).")
  hints = typing.get_type_hints(entry.settings)
  kw = {}
  for key, value in values.items():
    kw[key] = _coerce(value, _types(hints[key]), f"{where}.{key}")
    choices = fields[key].metadata.get("choices")
    if choices is not None and kw[key] not in choices:
      raise ValueError(f"{where}.{key}={kw[key]!r} is unknown; valid: "
                       f"{', '.join(map(str, choices))}.")
  settings = entry.settings(**kw)
  settings.check(where)
  return entry, settings


def build_sections(compress: Mapping, ctx: Context):
  """config.compress -> [(section, Entry, settings, Built)] in composition order."""
  parsed = []
  for section, values in compress.items():
    if section in NOT_METHODS or not values:
      continue
    if not isinstance(values, Mapping) and not hasattr(values, "to_dict"):
      raise ValueError(f"config.compress.{section}={values!r} must be a dict naming a "
                       f"method, e.g. dict(method='magnitude', sparsity=0.5).")
    entry, settings = parse(section, values.to_dict() if hasattr(values, "to_dict")
                            else values)
    parsed.append((entry.stage, section, entry, settings))
  out = []
  for _, section, entry, settings in sorted(parsed, key=lambda t: t[:2]):
    where = f"config.compress.{section}"
    built = settings.build(ctx, where)
    if not isinstance(built, Built):
      built = Built(built)
    try:  # the method's own shape checks, named by the section they come from
      Plan(built.part).check(ctx.shapes)
    except ValueError as e:
      raise ValueError(f"{where} ({entry.name}): {e}") from None
    out.append((section, entry, settings, built))
  return out


# ---------------------------------------------------------------- the reference

def _type_name(hint) -> str:
  names = [("dict" if dataclasses.is_dataclass(t) else t.__name__)
           if t is not type(None) else "None" for t in _types(hint)]
  return " or ".join(names)


def _default(value) -> str:
  return repr(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)


def reference_markdown() -> str:
  """Every registered method's settings, grouped by stage: the config reference."""
  lines = ["# Compression methods: config reference", "",
           "Generated by `python -m mmjax.cli.reference --out=docs/reference` from the "
           "registered settings dataclasses (`mmjax/methods/`); `tests/test_docs.py` checks "
           "it is current.", "",
           "A run selects methods by section: `config.compress.<section> = dict(method=<name>,"
           " <setting>=<value>, ...)`; any number of sections, composed in the stage order "
           "below. A `pattern` of None takes the model family's default "
           "(`mmjax/harness/family.py`).", ""]
  for stage, title in STAGE_NAMES.items():
    entries = sorted((e for e in REGISTRY.values() if e.stage == stage), key=lambda e: e.name)
    if not entries:
      continue
    lines += [f"## {title}", ""]
    for e in entries:
      hints = typing.get_type_hints(e.settings)
      lines += [f"### `{e.name}`", "", e.doc, "", "| setting | type | default | meaning |",
                "|---|---|---|---|"]
      for f in dataclasses.fields(e.settings):
        meaning = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
          meaning += " (" + " \\| ".join(map(str, f.metadata["choices"])) + ")"
        lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{_default(f.default)}` | "
                     f"{meaning} |")
      lines.append("")
  return "\n".join(lines)
