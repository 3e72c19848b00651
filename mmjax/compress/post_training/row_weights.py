"""How much each row of a layer's input matters to the task: the weights of modality-
balanced calibration (MBQ, Li et al. 2025) and of its per-token refinement.

GPTQ and AWQ minimise a layer's output error ‖X W − X Ŵ‖² with every row of X (every
token) counted once. MBQ observed that the task loss is far more sensitive to one
modality's tokens than another's (language over vision, in vision-language models) and
weighs each modality's reconstruction error by its sensitivity to the layer's output at
that modality's tokens, measured by the loss's gradient there. Here, for every
product that consumes a selected kernel, g = ∂L/∂y is found by adding a zero to the
product's output and differentiating with respect to it (`intercept.dots`: any JAX model),
each row's sensitivity is s_t = mean_n g_tn², and the rows' weights are

  token     r_t = s_t / mean(s)                       each token its own (a Fisher-weighted
                                                      Hessian, Σ r_t x_t x_tᵀ)
  modality  r_t = mean of s over t's modality / mean(s)   MBQ

the means taken over every calibration row of every use of the kernel. (The square makes
the weighted objective the Fisher's, E[(gᵀ Δy)²] with the gradients' cross terms
dropped; it is this module's choice of magnitude.) The statistics (`stats.of`) become
weighted sums. Weights come from the model the method starts from (its weights' view: the
dense model, or what earlier methods made of it), as in MBQ.

Which modality a row belongs to is the model's layout, not something the program shows:
`row_groups(apply_fn, params, batch)` (a family's) gives `fn(path, free_shape)`, an integer
id per row, or None for a kernel that one modality feeds. Such a kernel's modality weight is one constant,
and neither GPTQ's nor AWQ's solution changes when the objective is scaled: MBQ changes
only the kernels that see several modalities (a fusion's keys and values, a joint
encoder). `token` changes every kernel.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.compress import intercept
from mmjax.compress.post_training import stats as statistics

BALANCES = ("none", "modality", "token")


def check_balance(balance: str, where: str = "balance"):
  if balance not in BALANCES:
    raise ValueError(f"{where}={balance!r} is unknown; valid: {', '.join(BALANCES)}.")
  return balance


def row_sensitivity(d, g):
  """Mean squared output gradient per row of the product `d` (a `Dot` or `Conv`), flat in
  the order of `stats.rows` (the activation's free axes; a conv's output positions)."""
  g2 = jnp.square(g.astype(jnp.float32))
  if isinstance(d, intercept.Conv):
    out = d.dims.out_spec  # (batch axis, feature axis, spatial axes...)
    return jnp.transpose(g2, (out[0], *out[2:], out[1])).mean(-1).reshape(-1)
  (lc, rc), _ = d.dims
  n_w_free = d.w.ndim - len(rc if d.w_is_rhs else lc)
  axes = (tuple(range(g2.ndim - n_w_free, g2.ndim)) if d.w_is_rhs
          else tuple(range(n_w_free)))
  return g2.mean(axis=axes).reshape(-1)


def free_shape(d):
  """The shape of the rows of `d`'s activation (its free axes; a conv's output positions)."""
  if isinstance(d, intercept.Conv):
    out = d.dims.out_spec
    return tuple(d.out_aval.shape[a] for a in (out[0], *out[2:]))
  x_contract = set(d.x_contract())
  return tuple(n for a, n in enumerate(d.x.shape) if a not in x_contract)


def sensitivities(apply_fn: Callable, loss: Callable, paths: Sequence[str],
                  convs: bool = True, what: str = "calibration"):
  """-> (jitted f(params, batch) -> {path: [s per use]}: each use's row sensitivity, and
  `uses` {batch shapes: {path: [Dot or Conv per use]}}, filled as f is traced)."""
  uses = {}

  def f(params, batch):
    found = []

    def record(d):
      found.append(d)
      return d.bind(d.x, d.w)
    recorded = intercept.dots(apply_fn, list(paths), record, what, convs, scans=False)
    out_shape = jax.eval_shape(lambda: loss(recorded(params, batch), batch))
    zeros = [jnp.zeros(d.out_aval.shape, d.out_aval.dtype) for d in found]
    if not (hasattr(out_shape, "shape") and out_shape.shape == ()):
      raise ValueError(f"{what}: loss(outputs, batch) must return one scalar, and it returned "
                       f"{jax.tree.map(lambda a: a.shape, out_shape)}; a task's loss returns "
                       "(value, metrics): pass loss=lambda outputs, batch: "
                       "task.loss(outputs[0], batch)[0].")

    def task_loss(eps):
      it = iter(eps)
      out = intercept.dots(apply_fn, list(paths), lambda d: d.bind(d.x, d.w) + next(it),
                           what, convs, scans=False)(params, batch)
      return loss(out, batch)

    grads = jax.grad(task_loss)(zeros)
    out, mine = {}, uses.setdefault(signature(batch), {})
    mine.clear()
    for d, g in zip(found, grads):
      mine.setdefault(d.path, []).append(d)
      out.setdefault(d.path, []).append(row_sensitivity(d, g))
    return out

  return jax.jit(f), uses


def signature(batch):
  return tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(batch))


def weights(apply_fn: Callable, params, batches: Sequence, paths: Sequence[str],
            balance: str, loss: Optional[Callable], row_groups: Optional[Callable] = None,
            convs: bool = True, what: str = "calibration") -> list:
  """-> per batch, {path: [row weights per use]} (float32, flat like `stats.rows`), for
  `balance` in {"modality", "token"}, divided by the mean sensitivity over every row of
  every use of the path in every batch (so a kernel used twice keeps the difference
  between its uses). With `modality`, a use that one modality feeds (the layout gives None)
  weighs its rows by their mean: a kernel each modality uses once (shared weights) gets
  MBQ's per-modality weights too. A path whose rows all have zero sensitivity (nothing the
  loss sees depends on it) weighs them equally; so does a use the statistics cannot read
  (a batched product: `stats.check_uses` names it)."""
  check_balance(balance, f"{what}: balance")
  if loss is None:
    raise ValueError(f"{what}: balance={balance!r} weighs tokens by the gradient of the task "
                     "loss, and the calibration was given none; pass loss=fn(outputs, batch) "
                     "-> scalar to plan.calibrate (the harness passes the task's).")
  f, uses = sensitivities(apply_fn, loss, paths, convs, what)
  per_batch = [jax.device_get(f(params, b)) for b in batches]
  readable = lambda d: statistics.unsupported(d) is None
  layouts = {}  # per batch shape: the model's row layout, read off this forward
  if balance == "modality":
    if row_groups is None:
      raise ValueError(f"{what}: balance='modality' needs to know which modality each token "
                       "of a layer belongs to, and the model gave no row_groups; use "
                       "balance='token' (per token, no layout needed), or give the family a "
                       "row_groups.")
    for b in batches:
      if signature(b) not in layouts:
        layouts[signature(b)] = row_groups(apply_fn, params, b)
  ids = [{p: [_row_ids(layouts[signature(b)], p, d, what)
              if balance == "modality" and readable(d) else None for d in ds]
          for p, ds in uses[signature(b)].items()} for b in batches]
  out = [dict() for _ in batches]
  for p, ds in per_batch[0].items():
    n_uses = len(ds)
    s = [[np.asarray(pb[p][k], np.float64) for pb in per_batch] for k in range(n_uses)]
    mean = np.mean(np.concatenate([x for per_use in s for x in per_use]))
    for k in range(n_uses):
      d0 = uses[signature(batches[0])][p][k]
      if not mean > 0 or not readable(d0):
        r = [np.ones_like(sb) for sb in s[k]]
      elif balance == "token":
        r = [sb / mean for sb in s[k]]
      elif ids[0][p][k] is None:  # one modality: its mean, one constant
        use_mean = np.mean(np.concatenate(s[k]))
        r = [np.full_like(sb, use_mean / mean) for sb in s[k]]
      else:
        r = [m / mean for m in _group_means(s[k], [i[p][k] for i in ids])]
      for b, rb in enumerate(r):
        out[b].setdefault(p, []).append(rb.astype(np.float32))
  return out


def _row_ids(layout, path, d, what):
  """Integer modality ids of a use's rows (flat), or None: one modality."""
  shape = free_shape(d)
  got = layout(path, shape)
  if got is None:
    return None
  got = np.asarray(got)
  if not (np.issubdtype(got.dtype, np.integer) and (got.size == 0 or got.min() >= 0)):
    raise ValueError(f"{what}: the model's row_groups gives {path} modality ids {got.dtype} "
                     f"from {got.min() if got.size else '-'}; they must be integers >= 0 (one "
                     "per modality).")
  try:
    return np.broadcast_to(got, shape).reshape(-1)
  except ValueError:
    raise ValueError(f"{what}: the model's row_groups gives {path} modality ids of shape "
                     f"{got.shape}, but its input has rows {shape} (token merging or pruning "
                     "changed the token counts?); use balance='token'.") from None


def _group_means(s: list, ids: list) -> list:
  """Each row's sensitivity replaced by the mean over its group's rows in every batch
  (`s`, `ids`: per batch, flat)."""
  n = max(int(i.max()) for i in ids) + 1
  total = sum(np.bincount(i, sb, n) for i, sb in zip(ids, s))
  count = sum(np.bincount(i, None, n) for i in ids)
  mean = total / np.maximum(count, 1)
  return [mean[i] for i in ids]
