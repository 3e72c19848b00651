"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, then quantize
both to int8.

Per input channel k, s_k = max|x_k|^α / max_j|W_kj|^(1-α) (α, the migration strength,
0.5 by default). The product X W is computed as (X diag(s)⁻¹)(diag(s) W): unchanged in
exact arithmetic, but the activation's channels are flattened, so one per-tensor int8 scale
fits them, while the weight (per output channel int8) absorbs the range. The model-agnostic
form keeps the division by s inside the intercepted product (a deployment folds it into
the preceding LayerNorm); the weights in the parameter tree stay W, and the view is
diag(s)⁻¹ Q(diag(s) W), so the same plan fine-tunes. Products run through the existing
paths: fake-quant (`mode="fake"`) or real int8 × int8 → int32 (`mode="int8"`), whose
per-channel weight codes of diag(s) W are exactly the view's.

Stacked layers (`layout.stacked`, a scan over layers): each layer gets its own smoothing
[depth, K] and activation scale [depth], from its own inputs (the scan unrolled for
calibration, `unroll`); the rewrite inside the kept scan indexes them by iteration.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.compress import activations, intercept, layout, quant, storage, unroll
from mmjax.compress.core import Method
from mmjax.compress.formats import grid as make_grid
from mmjax.compress.post_training import method as pt, stats as statistics

W8 = make_grid("int", 8)


def _along(v, axes_sorted, shape):
  """v [K] (matrix-view order of the contracted axes `axes_sorted`) broadcast on `shape`."""
  return v.reshape([shape[a] if a in axes_sorted else 1 for a in range(len(shape))])


def _for_x(v, d: intercept.Dot):
  """The per-channel vector laid along the activation's contracted axes."""
  wc, xc = d.w_contract(), d.x_contract()
  ws = sorted(wc)
  t = v.reshape([d.w.shape[a] for a in ws])
  x_sorted = sorted(xc)
  t = jnp.transpose(t, [ws.index(wc[xc.index(a)]) for a in x_sorted])
  return t.reshape([d.x.shape[a] if a in xc else 1 for a in range(d.x.ndim)])


def smoothing(amax_x, w_mat, alpha):
  amax_w = jnp.max(jnp.abs(w_mat), axis=1)
  s = jnp.maximum(amax_x, 1e-5) ** alpha / jnp.maximum(amax_w, 1e-5) ** (1.0 - alpha)
  return jnp.maximum(s, 1e-5)


def method(alpha: float = 0.5, *, mode: str = "fake", int8_grads: bool = True,
           contract=None, name: str | None = None) -> Method:
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"SmoothQuant alpha={alpha} must be in [0, 1] (0.5 is the paper's "
                     "default; higher moves more of the range into the weights).")
  if mode not in activations.MODES:
    raise ValueError(f"SmoothQuant mode={mode!r} is unknown; valid: fake, int8.")
  alpha = float(alpha)

  def axes(path, w):
    return layout.contract_axes(contract, path, w.ndim)

  def stack(path, w):  # the stack axes' shape: () unless stacked
    return tuple(w.shape[:layout.depth_axes(contract, path, w.ndim)])

  def init(flat, rng):
    return {p: {"smooth": jnp.ones(stack(p, w) + (layout.to_matrix(w, axes(p, w)).shape[0],),
                                   jnp.float32),
                "act_scale": jnp.ones(stack(p, w), jnp.float32)} for p, w in flat.items()}

  def view(flat, state):
    out = {}
    for p, w in flat.items():
      ax = axes(p, w)
      m = layout.to_matrix(w, ax)
      s = pt.in_columns(state[p]["smooth"], m.shape[1]).astype(m.dtype)
      ms = m * s
      q = W8.fake(ms, *W8.fit(jax.lax.stop_gradient(ms))) / s
      out[p] = layout.from_matrix(q, w.shape, ax).astype(w.dtype)
    return out

  def wrap(apply_fn, state, paths):
    def rewrite(d: intercept.Dot):
      st = state[d.path]
      if d.layer is not None and st["smooth"].ndim == 2:  # stacked: this layer's
        st = {k: v[d.layer] for k, v in st.items()}
      s = st["smooth"]
      x = d.x / _for_x(s, d).astype(d.x.dtype)
      w = d.w * _along(s, sorted(d.w_contract()), d.w.shape).astype(d.w.dtype)
      if mode == "fake":
        return d.bind(quant.fake_quant_with_scale(x, st["act_scale"], 8), w)
      smoothed = d._replace(x=x, w=w)
      return activations.rewriter({d.path: st["act_scale"]}, 8, "int8", int8_grads)(smoothed)
    return intercept.dots(apply_fn, paths, rewrite, "SmoothQuant")

  def one(amax_x, w_mat):
    s = smoothing(amax_x, w_mat, alpha)
    return {"smooth": s.astype(jnp.float32),
            "act_scale": (jnp.max(amax_x / s) / quant.qmax(8)).astype(jnp.float32)}

  def calibrate(flat, state, calib):
    fn, params, paths = calib.apply_fn, calib.params, list(calib.paths)
    contract_of = lambda path, ndim: layout.contract_axes(contract, path, ndim)
    layers = {}
    if calib.batches:
      u = unroll.unroll(fn, params, calib.batches[0], paths, "SmoothQuant")
      if u is not None:
        pt.check_stacked(u.layers, {p: w.shape for p, w in flat.items()}, contract,
                         "SmoothQuant")
        fn, params, paths, layers = u.apply_fn, u.params, u.paths, u.layers
        contract_of = pt.layer_contract(contract, u)
    got, _ = statistics.collect(fn, params, calib.batches, paths, ("amax",), contract_of,
                                convs=False, what="SmoothQuant")
    new = {}
    for p, w in flat.items():
      if p not in layers:
        new[p] = one(got[p]["amax"], layout.to_matrix(w, axes(p, w)))
        continue
      sub = tuple(a - 1 for a in axes(p, w))
      per = [one(got[v]["amax"], layout.to_matrix(w[i], sub)) for i, v in enumerate(layers[p])]
      new[p] = {k: jnp.stack([s[k] for s in per]) for k in per[0]}
    return flat, new

  def describe(flat, state):
    out = {}
    for p, w in flat.items():
      s = state[p]["smooth"]
      m = layout.to_matrix(w, axes(p, w))
      scale, zero = W8.fit(m * pt.in_columns(s, m.shape[1]))
      # the export stores the weights (codes of diag(s) W, and s); the smoothed int8
      # activations are served through the plan's wrap
      out[p] = storage.GridCodes(scale, zero, s, grid=W8, contract=tuple(axes(p, w)),
                                 label="w8c_smoothed")
    return out

  return Method(name or f"smoothquant_{alpha:g}_{mode}", init=init, view=view, wrap=wrap,
                calibrate=calibrate, describe=describe,
                check=lambda shapes: layout.check(contract, shapes, "SmoothQuant"))
