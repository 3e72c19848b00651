"""Rules: which leaves each method owns. `rules([(regex, method), ...])` gives each path to
the first rule whose regex matches it in full; of those, a method takes the leaves its
`accepts` takes, and the others are left as they are (said once, and in `describe`)."""
from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple, Sequence

from mmjax.compress.paths import leaf_specs, match_paths
from mmjax.compress.protocol import Method


class Entry(NamedTuple):
  method: Method
  paths: tuple  # the leaves the method owns (empty for a loss-only method)
  skipped: tuple = ()  # ((path, why), ...): matched by its rule, refused by its `accepts`


def _take(method: Method, rule: str, hits: Sequence[str], specs: dict | None) -> Entry:
  """The leaves of `hits` the method accepts (all of them without `accepts` or `specs`);
  the others are skipped, said once in a warning; none taken is an error."""
  if method.accepts is None or specs is None or not hits:
    return Entry(method, tuple(hits))
  taken, skipped = [], []
  for p in hits:
    why = method.accepts(p, specs[p])
    if why is None:
      taken.append(p)
    else:
      skipped.append((p, str(why)))
  if skipped:
    some = "; ".join(f"{p}: {why}" for p, why in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    if not taken:
      raise ValueError(f"{rule}: compression method {method.name!r} can compress none of the "
                       f"{len(hits)} leaves it matches ({some}{more}); narrow the rule to "
                       "leaves it compresses (e.g. '.*/kernel') or give them another method.")
    warnings.warn(f"{rule}: compression method {method.name!r} leaves {len(skipped)} of the "
                  f"{len(hits)} leaves it matches as they are ({some}{more}); they are "
                  "described as skipped (narrow the rule to silence this).")
  return Entry(method, tuple(taken), tuple(skipped))


@dataclasses.dataclass(frozen=True)
class Rules:
  """[(regex, method), ...]: each path to the first rule whose regex matches it in full;
  of those, the method takes the leaves its `accepts` takes (given their `specs`)."""
  pairs: tuple

  def bind(self, paths: Sequence[str], specs: dict | None = None) -> list:
    paths = sorted(paths)
    owned, claimed = [], set()
    for pattern, method in self.pairs:
      if not isinstance(method, Method):
        raise TypeError(f"rule {pattern!r}: {method!r} is not a compression Method.")
      hits = [p for p in match_paths(pattern, paths) if p not in claimed]
      if not hits:
        raise ValueError(f"rule {pattern!r} matches only paths an earlier rule already took "
                         f"({match_paths(pattern, paths)[:4]}...); reorder or narrow the "
                         "rules.")
      claimed.update(hits)  # a leaf the method skips stays with its rule (first match wins)
      owned.append(_take(method, f"rule {pattern!r}", hits, specs))
    return owned


def rules(pairs: Sequence[tuple], paths=None) -> Rules:
  """Path rules; with `paths` (the model's, known from its config before any parameter
  exists; `{path: shape}` also runs the methods' `accepts`) they are checked at once, so a
  bad regex fails at config time."""
  r = Rules(tuple((p, m) for p, m in pairs))
  if paths is not None:
    r.bind(list(paths), leaf_specs(paths) if isinstance(paths, dict) else None)
  return r
