"""Activation quantization: the inputs of the matmuls that consume the matched weights.

`inputs(bits, mode)` is a `Method` whose rule selects weights by path, like every other
method; its `wrap` stage rewrites the products that consume them in the traced forward
(`intercept.dots`, so any JAX model works, not only linen):

  calibrate             max|x| (or a percentile of |x|) of each matched product's input
                        over the batches handed in: the ranges for PTQ
  mode="fake"           the input quantized to `bits` (symmetric, per tensor, the calibrated
                        scale) before the product: fake-quant, straight-through gradients
  mode="int8"           the product as real integer arithmetic: int8 inputs x int8
                        per-output-channel weight codes -> int32 `dot_general`, rescaled by
                        s_x * s_w. Its outputs equal the fake-quant path's to float rounding
                        (tested). Backward: straight-through; for a 2-D [in, out] kernel its
                        two matmuls are int8 too by default (`int8_grads`), else float.

State: `{path: float32 scale}`, an ordinary pytree in the compression state. Weight codes
use `quant.quantize`'s per-channel rule over the product's contracted axes, so a plan that
fake-quantizes kernels to int8 and this int8 path see identical weights.

Uncalibrated scales. `init` sets every scale to 0.0, which no calibration gives (a
calibrated scale is amax / qmax with amax >= 1e-8): "not calibrated yet". The state keeps
its structure and dtypes through `calibrate` (a trainer takes the abstract state from
`jax.eval_shape` of init and restores checkpoints with it; states saved before this
convention, whose scales are calibrated or the old 1.0 placeholder, read unchanged).
Where the scales are concrete (eager `plan.apply`/`wrap`, `describe`, the export), an
uncalibrated one is an error ("calibrate first"). Inside `jit`, where the state is traced,
a product whose scale is not calibrated quantizes its input with the current batch's own
range (per tensor, max|x| / qmax, as one calibration batch would give); a calibrated scale
is used as it is: `where(scale > 0, scale, dynamic)`, which costs one max|x| reduction of
each quantized input. `init` warns once that the scales await calibration.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from mmjax.compress import formats, intercept, quant, storage, unroll
from mmjax.compress.core import Method

MODES = ("fake", "int8")


# ------------------------------------------------------- the 2-D int8 matmul (x @ W)

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def int8_matmul(x, kernel, x_scale, int8_grads: bool = True):
  """x [..., k] float, kernel [k, n] float -> float: int8(x) @ int8(kernel) in int32.

  Gradients are straight-through (those of the dequantized product, zero where x was
  clipped). With `int8_grads` the two backward products run in int8 too (the output
  gradient quantized per tensor, the kernel per tensor for dX), so all three matmuls of
  the layer are integer; otherwise they are float matmuls of the dequantized operands."""
  return _int8_forward(x, kernel, x_scale)[0]


def _quantize_per_tensor(a):
  qm = quant.qmax(8)
  scale = jnp.maximum(jnp.max(jnp.abs(a)), 1e-30) / qm
  return jnp.clip(jnp.round(a / scale), -qm, qm).astype(jnp.int8), scale


def _codes(x, x_scale):
  qm = quant.qmax(8)
  return jnp.clip(jnp.round(x / x_scale), -qm, qm).astype(jnp.int8)


def _int8_forward(x, kernel, x_scale):
  xq = _codes(x, x_scale)
  wq, w_scale = quant.quantize(kernel, 8, "channel")
  acc = jax.lax.dot_general(xq, wq, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * (x_scale * w_scale[0])
  return y, (xq, wq, w_scale[0])


def _int8_fwd(x, kernel, x_scale, int8_grads):
  y, (xq, wq, w_scale) = _int8_forward(x, kernel, x_scale)
  inside = jnp.abs(x) <= x_scale * quant.qmax(8)
  return y, (xq, wq, w_scale, x_scale, inside)


# dW contracts over every token; above this many, int32 could overflow (127 * 127 a token)
_MAX_INT8_CONTRACTION = (2 ** 31 - 1) // (127 * 127)


def _transposed(a):
  """a.T [c, r]; on CPU materialized by a gather. XLA folds a plain transpose into the
  matmul's dimension numbers, and XLA:CPU runs int8 matmuls fast (YNNPACK) only for
  row-major [M, K] x [K, N] operands: a transposed int8 operand falls back to an int32
  matmul 6x slower than float (measured: dW 10.2 ms int8 vs 1.6 ms fp32 at T=5056, k=128,
  n=352; through the gather 2.6 ms, and the whole int8 step 0.90x dense instead of 1.38x).
  Other platforms get the plain transpose (the gather would also defeat batch sharding):
  chosen where the program is lowered (`lax.platform_dependent`), so a program exported
  from this CPU for cuda or tpu carries the transpose, not the CPU trick (tested)."""
  def gather(a):
    r, c = a.shape
    idx = (jnp.arange(r, dtype=jnp.int32)[None, :] * c
           + jnp.arange(c, dtype=jnp.int32)[:, None]).reshape(-1)
    return jnp.take(a.reshape(-1), idx, unique_indices=True).reshape(c, r)
  return jax.lax.platform_dependent(a, cpu=gather, default=lambda a: a.T)


def _int8_bwd(int8_grads, res, g):
  xq, wq, w_scale, x_scale, inside = res
  k, n = wq.shape
  x2, g2 = xq.reshape(-1, k), g.reshape(-1, n)
  if int8_grads and x2.shape[0] <= _MAX_INT8_CONTRACTION:
    gq, g_scale = _quantize_per_tensor(g2)
    # W's per-channel scales run along dX's contracted axis: requantize W per tensor
    wtq, wt_scale = _quantize_per_tensor(wq.astype(jnp.float32) * w_scale)
    gx = jax.lax.dot_general(gq, _transposed(wtq), (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.int32)
    gx = gx.astype(jnp.float32) * (g_scale * wt_scale)
    gw = jax.lax.dot_general(_transposed(x2), gq, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.int32)
    gw = gw.astype(jnp.float32) * (x_scale * g_scale)
  else:
    gx = g2 @ (wq.astype(jnp.float32) * w_scale).T
    gw = (x2.astype(jnp.float32) * x_scale).T @ g2
  gx = gx.reshape(xq.shape) * inside
  return gx, gw, jnp.zeros_like(x_scale)


int8_matmul.defvjp(_int8_fwd, _int8_bwd)


# ---------------------------------------------------- any dot_general (DenseGeneral, ...)

def _scale_for_output(d: intercept.Dot, w_scale, x_ndim):
  """The per-channel weight scale (keepdims over the contracted axes) laid out like the
  product's output: batch dims, then the lhs free dims, then the rhs free dims."""
  (lc, rc), (lb, rb) = d.dims
  wc, wb = (rc, rb) if d.w_is_rhs else (lc, lb)
  xc, xb = (lc, lb) if d.w_is_rhs else (rc, rb)
  nc = [a for a in range(d.w.ndim) if a not in wc]
  s = jnp.squeeze(w_scale, axis=tuple(wc))
  order = list(wb) + [a for a in nc if a not in wb]
  s = jnp.transpose(s, [nc.index(a) for a in order])
  x_free = x_ndim - len(xc) - len(xb)
  nb = len(wb)
  if d.w_is_rhs:
    return s.reshape(s.shape[:nb] + (1,) * x_free + s.shape[nb:])
  return s.reshape(s.shape + (1,) * x_free)


def _int8_dot(d: intercept.Dot, x_scale):
  """int8 x int8 -> int32 for any dimension numbers; float straight-through backward. The
  scale is an argument, not a closure: inside a scan over stacked layers it is the
  iteration's (a value of the scan body, which a custom_vjp may not close over)."""
  params = {k: v for k, v in d.params.items() if k != "preferred_element_type"}

  @jax.custom_vjp
  def f(x, w, x_scale):
    wq, w_scale = quant.quantize(w, 8, "channel", contract=d.w_contract())
    args = (_codes(x, x_scale), wq) if d.w_is_rhs else (wq, _codes(x, x_scale))
    acc = jax.lax.dot_general_p.bind(*args, preferred_element_type=jnp.int32, **params)
    return acc.astype(jnp.float32) * x_scale * _scale_for_output(d, w_scale, x.ndim)

  def deq(x, w, x_scale):  # the dequantized product, identity gradients through rounding
    wq, w_scale = quant.quantize(w, 8, "channel", contract=d.w_contract())
    xd = x + jax.lax.stop_gradient(_codes(x, x_scale).astype(jnp.float32) * x_scale - x)
    wd = w + jax.lax.stop_gradient(wq.astype(jnp.float32) * w_scale - w)
    args = (xd, wd) if d.w_is_rhs else (wd, xd)
    return jax.lax.dot_general(*args, d.dims)

  def fwd(x, w, x_scale):
    return f(x, w, x_scale), (x, w, x_scale)

  def bwd(res, g):
    x, w, x_scale = res
    _, vjp = jax.vjp(lambda x, w: deq(x, w, x_scale), x, w)
    gx, gw = vjp(g)
    gx = gx * (jnp.abs(x) <= x_scale * quant.qmax(8))
    return gx, gw, jnp.zeros_like(x_scale)  # straight through the weight's rounding

  f.defvjp(fwd, bwd)
  return f(d.x.astype(jnp.float32), d.w.astype(jnp.float32), jnp.asarray(x_scale, jnp.float32))


def _is_plain_matmul(d: intercept.Dot):
  (lc, rc), (lb, rb) = d.dims
  return (d.w_is_rhs and d.w.ndim == 2 and not lb and not rb
          and tuple(lc) == (d.x.ndim - 1,) and tuple(rc) == (0,))


# ------------------------------------------------------------------- the method

def fake_quant_input(x, scale, bits):
  """Per-tensor symmetric fake-quant with a fixed (calibrated) scale; STE inside range."""
  return quant.fake_quant_with_scale(x, scale, bits)


def _top(bits: int, fmt: str) -> float:
  """The largest code: qmax for integers, the format's max for fp8."""
  return quant.qmax(bits) if fmt == "int" else float(jnp.finfo(
      getattr(jnp, formats._FP8[fmt])).max)


def dynamic_scale(x, bits: int = 8, fmt: str = "int"):
  """The per-tensor scale of `x` itself, as `scales_from_amax` gives from one batch's max|x|
  (float32; no gradient flows into it)."""
  amax = jnp.max(jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32)))
  return jnp.maximum(amax, jnp.float32(1e-8)) / jnp.float32(_top(bits, fmt))


def uncalibrated(scales: dict) -> list:
  """The paths whose concrete scale is not calibrated (<= 0, or NaN); traced ones are not
  known here and are not listed."""
  concrete = {p: s for p, s in scales.items() if not isinstance(s, jax.core.Tracer)}
  values = jax.device_get(concrete)  # a stacked layer's scales: one per layer
  return sorted(p for p, v in values.items() if not bool(np.all(np.asarray(v) > 0.0)))


def calibrate_first(what: str, missing: list, total: int) -> str:
  return (f"{what}: calibrate first: call plan.calibrate(apply_fn, params, cstate, batches) "
          f"before using the compressed model ({len(missing)} of {total} input scales are "
          f"not calibrated, e.g. {missing[0]}).")


def rewriter(scales: dict, bits: int = 8, mode: str = "fake", int8_grads: bool = True,
             fmt: str = "int", dynamic: bool = False):
  """The product rewrite for `intercept.dots`: fake-quant inputs (an integer grid or fp8),
  or int8 products. With `dynamic`, a traced scale that is not calibrated (<= 0) is
  replaced by the input's own per-tensor scale (`dynamic_scale`)."""
  fp8 = formats.grid(fmt) if fmt != "int" else None

  def rewrite(d: intercept.Dot):
    s = scales[d.path]
    if d.layer is not None and jnp.ndim(s):  # stacked layers: this iteration's scale
      s = jnp.asarray(s)[d.layer]
    if dynamic and isinstance(s, jax.core.Tracer):
      s = jnp.where(s > 0, s, dynamic_scale(d.x, bits, fmt))
    if fp8 is not None:
      return d.bind(fp8.fake(d.x, s, 0.0), d.w)
    if mode == "fake":
      return d.bind(fake_quant_input(d.x, s, bits), d.w)
    if _is_plain_matmul(d):
      y = int8_matmul(d.x.astype(jnp.float32), d.w.astype(jnp.float32), s, int8_grads)
    else:
      y = _int8_dot(d, s)
    return y.astype(d.out_aval.dtype)
  return rewrite


def apply_quantized(apply_fn, scales: dict, bits: int = 8, mode: str = "fake",
                    int8_grads: bool = True, fmt: str = "int"):
  """`apply_fn` with the inputs of the products consuming `scales`' paths quantized: what
  an exported model runs (`export.load_activation_scales` gives the scales)."""
  return intercept.dots(apply_fn, list(scales), rewriter(scales, bits, mode, int8_grads, fmt))


def scales_from_amax(amax: dict, bits: int = 8, fmt: str = "int") -> dict:
  """{path: max|x|} -> {path: scale}; a stacked layer's list of maxima -> [depth] scales."""
  top = _top(bits, fmt)
  one = lambda v: max(v, 1e-8) / top
  return {k: (jnp.asarray([one(x) for x in v], jnp.float32) if isinstance(v, list)
              else jnp.float32(one(v))) for k, v in amax.items()}


def calibrate(apply_fn, params, batches, paths, percentile: float | None = None) -> dict:
  """{path: max|input|} over `batches` (max over batches and uses of each batch's max, or
  of its `percentile`-th percentile of |x|, which ignores rare outliers); for a stacked
  leaf under a scan, a list with each layer's (the scan unrolled: `unroll`)."""
  if not batches:
    raise ValueError("activation calibration needs at least one batch.")
  u = unroll.unroll(apply_fn, params, batches[0], list(paths), "activation calibration")
  if u is not None:
    amax = calibrate(u.apply_fn, u.params, batches, u.paths, percentile)
    for p, vs in u.layers.items():
      amax[p] = [amax.pop(v) for v in vs]
    return amax

  def stat(d):
    a = jnp.abs(d.x.astype(jnp.float32))
    return jnp.max(a) if percentile is None else jnp.percentile(a, percentile)

  fn = jax.jit(intercept.observe(apply_fn, paths, stat))
  amax = {}
  for batch in batches:
    for k, v in jax.device_get(fn(params, batch)).items():
      amax[k] = max([float(x) for x in v] + [amax.get(k, 0.0)])
  if not batches:
    raise ValueError("activation calibration needs at least one batch.")
  return amax


FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")


def inputs(bits: int = 8, mode: str = "fake", *, int8_grads: bool = True,
           percentile: float | None = None, fmt: str = "int",
           name: str | None = None) -> Method:
  """Quantize the inputs of the products that consume the rule's weights (calibrated):
  `fmt="int"` to `bits`-wide integers, or to fp8 ("fp8_e4m3", "fp8_e5m2"; fake-quant, one
  per-tensor scale amax / fp8 max)."""
  quant.check_bits(bits, "activation bits")
  if fmt not in FORMATS:
    raise ValueError(f"activation format={fmt!r} is unknown; valid: {', '.join(FORMATS)}.")
  if fmt != "int":
    formats.grid(fmt)  # the backend can represent it
    if mode != "fake":
      raise ValueError(f"activation format {fmt} runs as fake-quant only (mode='fake'); the "
                       "real integer path is int8.")
  if mode not in MODES:
    raise ValueError(f"activation quantization mode={mode!r} is unknown; valid: fake (fake-"
                     "quant inputs), int8 (real int8 x int8 -> int32 matmuls).")
  if mode == "int8" and bits != 8:
    raise ValueError(f"the int8 activation path needs bits=8, got bits={bits}.")
  if percentile is not None and not 50.0 <= float(percentile) <= 100.0:
    raise ValueError(f"activation percentile={percentile} must be in [50, 100].")

  label = name or (f"act{bits}_{mode}" if fmt == "int" else f"act_{fmt}")
  what = f"activation quantization {label!r}"

  def init(flat, rng):  # 0.0: not calibrated (calibrated once the weights are final)
    warnings.warn(f"{what}: the input scales of {len(flat)} layers are not calibrated; "
                  "call plan.calibrate(apply_fn, params, cstate, batches) before training or "
                  "evaluating (until then a jitted forward quantizes each input with its own "
                  "batch's max|x|, and an eager one, describe and export raise).")
    return {p: jnp.float32(0.0) for p in flat}

  def wrap(apply_fn, state, paths):
    missing = uncalibrated({p: state[p] for p in paths})
    if missing:
      raise ValueError(calibrate_first(what, missing, len(paths)))
    return intercept.dots(apply_fn, paths, rewriter(state, bits, mode, int8_grads, fmt,
                                                    dynamic=True),
                          f"activation quantization {name or ''}".strip())

  def calibrate_stage(flat, state, calib):
    amax = calibrate(calib.apply_fn, calib.params, calib.batches, calib.paths, percentile)
    return flat, scales_from_amax(amax, bits, fmt)

  def describe(flat, state):
    missing = uncalibrated({p: state[p] for p in flat})
    if missing:
      raise ValueError(calibrate_first(what, missing, len(flat)))
    return {p: storage.ActScale(state[p], bits if fmt == "int" else 8, mode, fmt)
            for p in flat}

  return Method(label, init=init, wrap=wrap, calibrate=calibrate_stage, describe=describe)
