"""Activation quantization of every Dense layer's input, without editing model code.

Flax's `nn.intercept_methods` sees each `nn.Dense.__call__`; three interceptors use it:

  calibrate(...)        runs batches through the model and records max|x| of each Dense
                        input (by module path): the activation ranges for PTQ
  interceptor(scales, mode="fake")
                        quantizes each calibrated Dense input to `bits` (symmetric, per
                        tensor) before the layer: fake-quant, straight-through gradients
  interceptor(scales, mode="int8")
                        computes the layer as real integer arithmetic: int8 inputs x int8
                        per-channel weight codes -> int32 `dot_general`, rescaled by
                        s_x * s_w, plus the float bias. Its outputs equal the fake-quant
                        path's to float rounding (tested). Its backward pass (int8 QAT) is
                        straight-through; by default its two matmuls are int8 as well
                        (output gradient and kernel quantized per tensor), else float.

Scales are a dict {module path: float32 scalar}, an ordinary pytree kept in the
compression state. Weight codes use the same per-channel rule as `quant.quantize`, so a
plan that fake-quantizes kernels to int8 and this int8 path see identical weights.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.compress import quant


def _path(module) -> str:
  return "/".join(module.path)


def _is_dense_call(context):
  return isinstance(context.module, nn.Dense) and context.method_name == "__call__"


def calibrate_trace(model, params, batch, percentile=None) -> dict:
  """{Dense path: max|input|} of one batch (traceable)."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if _is_dense_call(context):
      a = jnp.abs(args[0].astype(jnp.float32))
      found[_path(context.module)] = (jnp.max(a) if percentile is None
                                      else jnp.percentile(a, percentile))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, batch)
  return found


def calibrate(model, params, batches, percentile: float | None = None) -> dict:
  """{Dense path: max|input|} over `batches` (max over batches of each batch's max, or of
  its `percentile`-th percentile of |x|, which ignores rare outliers)."""
  def stats(params, batch):
    return calibrate_trace(model, params, batch, percentile)

  fn = jax.jit(stats)
  amax = {}
  for batch in batches:
    for k, v in jax.device_get(fn(params, batch)).items():
      amax[k] = max(float(v), amax.get(k, 0.0))
  if not amax:
    raise ValueError("calibration saw no Dense layer (no batches given?).")
  return amax


def scales_from_amax(amax: dict, bits: int = 8) -> dict:
  return {k: jnp.float32(max(v, 1e-8) / quant.qmax(bits)) for k, v in amax.items()}


def fake_quant_input(x, scale, bits):
  """Per-tensor symmetric fake-quant with a fixed (calibrated) scale; STE inside range."""
  c = scale * quant.qmax(bits)
  inside = jnp.abs(x) <= c
  xc = jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, -c, c)))
  return xc + jax.lax.stop_gradient(jnp.round(xc / scale) * scale - xc)


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


def _int8_forward(x, kernel, x_scale):
  qm = quant.qmax(8)
  xq = jnp.clip(jnp.round(x / x_scale), -qm, qm).astype(jnp.int8)
  wq, w_scale = quant.quantize(kernel, 8, "channel")
  acc = jax.lax.dot_general(xq, wq, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * (x_scale * w_scale)
  return y, (xq, wq, w_scale)


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
  Other backends get the plain transpose (the gather would also defeat batch sharding)."""
  if jax.default_backend() != "cpu":
    return a.T
  r, c = a.shape
  idx = (jnp.arange(r, dtype=jnp.int32)[None, :] * c
         + jnp.arange(c, dtype=jnp.int32)[:, None]).reshape(-1)
  return jnp.take(a.reshape(-1), idx, unique_indices=True).reshape(c, r)


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


def interceptor(scales: dict, bits: int = 8, mode: str = "fake", int8_grads: bool = True):
  """An interceptor for `nn.intercept_methods` quantizing the inputs of the Dense layers
  named in `scales` (`mode="fake"`), or running them as int8 matmuls (`mode="int8"`; with
  `int8_grads` their backward matmuls too)."""
  if mode not in ("fake", "int8"):
    raise ValueError(f"activation quantization mode={mode!r} is unknown; valid: fake, int8.")
  if mode == "int8" and bits != 8:
    raise ValueError(f"the int8 path needs bits=8, got bits={bits}.")

  def intercept(next_fun, args, kwargs, context):
    if not _is_dense_call(context):
      return next_fun(*args, **kwargs)
    s = scales.get(_path(context.module))
    if s is None:
      return next_fun(*args, **kwargs)
    x = args[0]
    if mode == "fake":
      return next_fun(fake_quant_input(x, s, bits), *args[1:], **kwargs)
    p = context.module.variables["params"]
    y = int8_matmul(x.astype(jnp.float32), p["kernel"].astype(jnp.float32), s, int8_grads)
    if "bias" in p:
      y = y + p["bias"]
    return y.astype(context.module.dtype or x.dtype)

  return intercept
