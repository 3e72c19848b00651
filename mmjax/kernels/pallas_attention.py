"""mmjax's attention semantics on JAX's own Pallas kernels (`jax.experimental.pallas.ops`):
the TPU flash attention and the GPU (Triton) attention. Nothing here is a new kernel: these
adapters map mmjax's layout, masks and lengths onto what each kernel accepts.

  tpu_flash   [b, h, len, d] layout; lengths padded to its 128 blocks; a key-padding mask
              ([b or 1, 1, 1, kv]) as segment ids (O(n)); any other mask or a bias as its
              additive `ab` [b, h, q, kv] (materialised: O(n^2) memory, still flash compute;
              the kernel adds it before scaling, so a bias enters divided by the scale)
  gpu_mha     [b, len, h, d]; q and kv padded to one power-of-two (or 128-multiple)
              length (its fused backward needs as many q as kv blocks); a key-padding mask
              as one extra head dimension: q' = [q, 1], k' = [k, 0 or -big], v' = [v, 0],
              which adds -big to the masked logits exactly; a general mask or a bias has
              no place in this kernel, so `pallas` computes those with xla on GPU
  pallas      the kernel of the platform the program is lowered for
              (`lax.platform_dependent`): tpu_flash on TPU, gpu_mha on CUDA, xla elsewhere
              (no Pallas kernel runs compiled on CPU; the tests run both in interpret mode)

Like every mmjax implementation, a query row that sees no key returns zeros.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_TPU_BLOCK = 128
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def key_padding(mask):
  """A [b or 1, 1, 1, kv] mask as a [b or 1, kv] vector, else None (a general mask)."""
  if mask is None or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
    return None
  return mask[:, 0, 0, :]


def _pad(x, axis, size, value=0):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _round_up(n, m):
  return -(-n // m) * m


def tpu_flash(q, k, v, mask, bias, is_causal, scale):
  """`jax.experimental.pallas.ops.tpu.flash_attention` with mmjax's semantics. mask/bias
  come 4-D ([b?, h?, q?, kv?]) or None. On a CPU it runs in interpret mode under
  `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (held while jitted code is
  traced, lowered and run)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, q_len, h, _ = q.shape
  kv_len = k.shape[1]
  qp, kp = _round_up(q_len, _TPU_BLOCK), _round_up(kv_len, _TPU_BLOCK)
  t = lambda x, n: _pad(jnp.swapaxes(x, 1, 2), 2, n)
  kvalid = key_padding(mask) if bias is None else None
  segment_ids = ab = None
  if mask is None and bias is None and kp == kv_len:
    pass
  elif bias is None and (mask is None or kvalid is not None):
    kv = (jnp.ones((b, kv_len), jnp.int32) if mask is None
          else jnp.broadcast_to(kvalid, (b, kv_len)).astype(jnp.int32))
    kv = jnp.where(jnp.any(kv > 0, axis=-1, keepdims=True), kv, 1)  # no key: see all, zeroed
    segment_ids = fa.SegmentIds(q=jnp.ones((b, qp), jnp.int32), kv=_pad(kv, 1, kp))
  else:
    logits = jnp.zeros((), jnp.float32)
    if bias is not None:  # the kernel adds `ab` before it scales: ab = bias / scale
      logits = logits + bias.astype(jnp.float32) / scale
    if mask is not None:
      # a row that sees no key is left unmasked (its output is zeroed by the caller; a
      # fully masked row gives the kernel's backward NaNs)
      m = jnp.broadcast_to(mask, (b, h, q_len, kv_len))
      seen = m if not is_causal else m & (jnp.arange(kv_len)[None, :] <=
                                          jnp.arange(q_len)[:, None])
      logits = jnp.where(m | ~jnp.any(seen, axis=-1, keepdims=True), logits, _NEG)
    ab = _pad(_pad(jnp.broadcast_to(logits, (b, h, q_len, kv_len)), 2, qp), 3, kp, _NEG)
  out = fa.flash_attention(t(q, qp), t(k, kp), t(v, kp), ab=ab, segment_ids=segment_ids,
                           causal=bool(is_causal), sm_scale=float(scale))
  return jnp.swapaxes(out, 1, 2)[:, :q_len]


def _gpu_length(n):
  return max(16, 1 << (n - 1).bit_length()) if n <= 128 else _round_up(n, 128)


def gpu_mha(q, k, v, mask, is_causal, scale, *, interpret=False):
  """`jax.experimental.pallas.ops.gpu.attention.mha` with mmjax's semantics, for no mask
  or a key-padding mask (see the module docstring). `interpret`: run it on this CPU."""
  from jax.experimental.pallas.ops.gpu import attention as ga
  b, q_len, h, d = q.shape
  kv_len = k.shape[1]
  n = _gpu_length(max(q_len, kv_len))
  kvalid = jnp.ones((b, kv_len), bool) if mask is None else jnp.broadcast_to(
      key_padding(mask), (b, kv_len))
  kvalid = _pad(kvalid, 1, n, False)
  big = min(1e9, 0.25 * float(jnp.finfo(q.dtype).max))
  extra = lambda x, col: jnp.concatenate([_pad(x, 1, n), col.astype(x.dtype)], axis=-1)
  qx = extra(q, jnp.ones((b, n, h, 1)))
  kx = extra(k, jnp.where(kvalid, 0.0, -big)[:, :, None, None] * jnp.ones((1, 1, h, 1)))
  vx = extra(v, jnp.zeros((b, n, h, 1)))
  out = ga.mha(qx, kx, vx, None, sm_scale=float(scale), causal=bool(is_causal),
               interpret=interpret)
  return out[:, :q_len, :, :d]


def pallas(q, k, v, mask, bias, is_causal, scale, xla):
  """The Pallas kernel of the platform being lowered for; `xla(q, k, v)` elsewhere (and
  on GPU for a general mask or a bias)."""
  gpu_ok = bias is None and (mask is None or key_padding(mask) is not None)
  cuda = ((lambda q, k, v: gpu_mha(q, k, v, mask, is_causal, scale)) if gpu_ok else xla)
  return lax.platform_dependent(
      q, k, v, tpu=lambda q, k, v: tpu_flash(q, k, v, mask, bias, is_causal, scale),
      cuda=cuda, default=xla)

