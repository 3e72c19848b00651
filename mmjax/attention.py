"""The one attention kernel every mmjax module calls: softmax(QKᵀ/√d_k + bias)V.

Shapes follow `jax.nn.dot_product_attention`: query ``[batch, q_len, heads, head_dim]``,
key/value ``[batch, kv_len, heads, head_dim]``. ``q_len`` may differ from ``kv_len``
(cross-modal attention: queries from one modality, keys and values from another).
``mask`` is boolean, broadcastable to ``[batch, heads, q_len, kv_len]``, True = may
attend; ``bias`` is added to the logits. ``is_causal`` lets query i see keys j <= i
(top-left aligned, as in `jax.nn`).

Implementations:
  * ``"reference"``: the literal formula, logits materialised; softmax in float32 for
    bf16/fp16 inputs. The yardstick the others are tested against.
  * ``"chunked"``: memory-efficient attention. Queries in blocks (``lax.map``), keys in
    blocks (``lax.scan``) with an online softmax; a ``custom_vjp`` backward recomputes
    each block from the saved log-sum-exp, so forward and backward need O(n) memory.
    Lengths need not divide the block sizes (inputs are padded, padding masked out).
    With ``is_causal``, key blocks entirely above the diagonal are skipped.
  * ``"xla"`` / ``"cudnn"``: delegate to `jax.nn.dot_product_attention`.
  * ``"pallas"``: JAX's own Pallas kernels (`pallas_attention.py`): the TPU flash
    attention when lowered for TPU, the GPU (Triton) attention when lowered for CUDA,
    xla elsewhere (and on GPU for a bias or a mask other than key padding).
  * ``None``: automatic, decided at trace time from static shapes (see
    `choose_implementation`): cuDNN flash attention on GPU for fp16/bf16 when it accepts
    the shapes (falling back to xla when it does not); when
    ``q_len * kv_len >= CHUNKED_MIN_LOGITS`` (where the logits no longer fit in cache and
    the materialised matrix dominates memory) pallas on TPU and on GPU (key-padding masks
    only), chunked elsewhere; xla otherwise.

Every implementation returns zeros (never NaN) for a query row whose keys are all masked.
All argument errors are `ValueError`s raised at trace time, before compilation.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmjax import pallas_attention

IMPLEMENTATIONS = ("reference", "chunked", "xla", "cudnn", "pallas")
# Automatic choice: chunked once a head's logit matrix has this many entries (on this
# 2-core CPU chunked ties xla below 512² and wins above; bench/README.md).
CHUNKED_MIN_LOGITS = 512 * 512
DEFAULT_Q_BLOCK = 512
DEFAULT_KV_BLOCK = 512
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def dot_product_attention(query, key, value, *, mask=None, bias=None, is_causal=False,
                          scale=None, implementation=None, q_block_size=None,
                          kv_block_size=None):
  """Scaled dot-product attention; see the module docstring for shapes and choices."""
  _validate(query, key, value, mask, bias, implementation)
  b, q_len, h, d = query.shape
  kv_len = key.shape[1]
  scale = float(1.0 / math.sqrt(d) if scale is None else scale)
  general = bias is not None or (mask is not None and
                                 pallas_attention.key_padding(_as_4d(mask)) is None)
  impl = implementation or choose_implementation(q_len, kv_len, d, query.dtype, general)
  if impl == "reference":
    return _reference(query, key, value, mask, bias, is_causal, scale)
  if impl == "chunked":
    return _chunked(query, key, value, mask, bias, is_causal, scale,
                    q_block_size or DEFAULT_Q_BLOCK, kv_block_size or DEFAULT_KV_BLOCK)
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"implementation='cudnn' needs a CUDA GPU, but the default backend is "
                     f"{jax.default_backend()!r}; use one of 'reference', 'chunked', 'xla' "
                     "or None (automatic).")
  if value.shape[-1] != d:
    raise ValueError(f"implementation={impl!r} needs value head_dim == query head_dim, got "
                     f"value {value.shape} and query {query.shape}; use 'reference' or "
                     "'chunked' for differing head dims.")
  if impl == "pallas":
    xla = lambda q, k, v: _via_jax_nn(q, k, v, mask, bias, is_causal, scale, "xla")
    out = pallas_attention.pallas(query, key, value, _as_4d(mask), _as_4d(bias), is_causal,
                                  scale, xla)
    return _zero_empty_rows(out, mask, is_causal, kv_len)
  if implementation is None and impl == "cudnn":
    try:
      return _via_jax_nn(query, key, value, mask, bias, is_causal, scale, "cudnn")
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
      impl = "xla"  # cuDNN refused these shapes/dtypes: documented fallback.
  return _via_jax_nn(query, key, value, mask, bias, is_causal, scale, impl)


def choose_implementation(q_len: int, kv_len: int, head_dim: int, dtype,
                          general_mask: bool = False) -> str:
  """The automatic choice, a pure function of static facts (documented above);
  `general_mask`: a bias, or a mask that is not a key-padding one."""
  dtype, backend = jnp.dtype(dtype), jax.default_backend()
  if (backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
      and head_dim <= 128 and head_dim % 8 == 0):
    return "cudnn"
  if q_len * kv_len >= CHUNKED_MIN_LOGITS:
    if backend == "tpu" or (backend == "gpu" and not general_mask):
      return "pallas"
    return "chunked"
  return "xla"


# ----------------------------------------------------------------------------- validation

def _shape_str(x):
  return "None" if x is None else str(tuple(np.shape(x)))


def _validate(query, key, value, mask, bias, implementation):
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got "
                     f"{implementation!r}.")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if np.ndim(x) != 4:
      raise ValueError(f"{name} must have rank 4 [batch, length, heads, head_dim], got shape "
                       f"{_shape_str(x)}.")
  if query.shape[0] != key.shape[0] or key.shape[0] != value.shape[0]:
    raise ValueError(f"batch sizes differ: query {query.shape}, key {key.shape}, value "
                     f"{value.shape}; all three need the same batch dimension (axis 0).")
  if query.shape[2] != key.shape[2] or key.shape[2] != value.shape[2]:
    raise ValueError(f"head counts differ: query {query.shape}, key {key.shape}, value "
                     f"{value.shape}; all three need the same number of heads (axis 2).")
  if key.shape[1] != value.shape[1]:
    raise ValueError(f"key and value lengths differ: key {key.shape}, value {value.shape}; "
                     "they need the same kv_len (axis 1).")
  if query.shape[3] != key.shape[3]:
    raise ValueError(f"head_dim mismatch: query {query.shape} has head_dim {query.shape[3]} "
                     f"but key {key.shape} has {key.shape[3]}; they must be equal.")
  b, q_len, h, _ = query.shape
  full = (b, h, q_len, key.shape[1])
  for name, x in (("mask", mask), ("bias", bias)):
    if x is None:
      continue
    if not _broadcasts_to(np.shape(x), full):
      raise ValueError(f"{name} of shape {_shape_str(x)} does not broadcast to [batch, heads, "
                       f"q_len, kv_len] = {full}.")
  if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}; "
                     "pass additive masks as `bias`.")


def _broadcasts_to(shape, full) -> bool:
  """Whether `shape` broadcasts to `full`, dimension by dimension (symbolic dimensions of a
  shape-polymorphic export compare too, which np.broadcast_shapes cannot)."""
  return len(shape) <= len(full) and all(
      s == 1 or s == f for s, f in zip(reversed(shape), reversed(full)))


def _as_4d(x):
  return None if x is None else jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)


def _causal(q_len, kv_len, q_offset=0, k_offset=0):
  qi = q_offset + lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 0)
  kj = k_offset + lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 1)
  return kj <= qi


def _row_has_key(mask, is_causal, q_len, kv_len):
  """[b?, h?, q, 1] bool: does the query row see any key at all (None: always)."""
  if mask is None:
    return None  # a causal row always sees key 0
  m = _as_4d(mask)
  if is_causal:
    m = m & _causal(q_len, kv_len)
  return jnp.any(m, axis=-1, keepdims=True)


def _zero_empty_rows(out, mask, is_causal, kv_len):
  """Zero the output rows of queries that see no key; out is [b, q, h, d]."""
  rows = _row_has_key(mask, is_causal, out.shape[1], kv_len)
  if rows is None:
    return out
  rows = jnp.swapaxes(rows, 1, 2)  # [b?, q, h?, 1]
  return jnp.where(rows, out, jnp.zeros((), out.dtype))


# ----------------------------------------------------------------------------- reference

def _reference(query, key, value, mask, bias, is_causal, scale):
  q_len, kv_len = query.shape[1], key.shape[1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + _as_4d(bias).astype(jnp.float32)
  valid = _as_4d(mask)
  if is_causal:
    c = _causal(q_len, kv_len)
    valid = c if valid is None else valid & c
  if valid is not None:
    logits = jnp.where(valid, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, value.astype(jnp.float32))
  return _zero_empty_rows(out, mask, is_causal, kv_len).astype(query.dtype)


# ----------------------------------------------------------------------------- xla / cudnn

def _via_jax_nn(query, key, value, mask, bias, is_causal, scale, impl):
  m4 = _as_4d(mask)
  b4 = None if bias is None else _as_4d(bias).astype(query.dtype)
  out = jax.nn.dot_product_attention(query, key, value, bias=b4, mask=m4, scale=scale,
                                     is_causal=is_causal, implementation=impl)
  return _zero_empty_rows(out, mask, is_causal, key.shape[1])


# ----------------------------------------------------------------------------- chunked

def _pad_axis(x, axis, new_size, value=0):
  if x is None or x.shape[axis] == 1 or x.shape[axis] == new_size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, new_size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _block(x, start_q, size_q, start_k, size_k):
  """Slice a [b?, h?, q?, k?] array to one (q block, k block); size-1 axes broadcast."""
  if x.shape[2] != 1:
    x = lax.dynamic_slice_in_dim(x, start_q, size_q, axis=2)
  if x.shape[3] != 1:
    x = lax.dynamic_slice_in_dim(x, start_k, size_k, axis=3)
  return x


def _round_up(n, m):
  return -(-n // m) * m


def _chunked(query, key, value, mask, bias, is_causal, scale, q_block, kv_block):
  b, q_len, h, _ = query.shape
  kv_len = key.shape[1]
  qb = min(q_block, q_len)
  kb = min(kv_block, kv_len)
  qp, kp = _round_up(q_len, qb), _round_up(kv_len, kb)
  # [b, h, len, d] layout once, so every block product is a plain batched matmul.
  q = _pad_axis(jnp.swapaxes(query, 1, 2), 2, qp)
  k = _pad_axis(jnp.swapaxes(key, 1, 2), 2, kp)
  v = _pad_axis(jnp.swapaxes(value, 1, 2), 2, kp)
  m4 = None if mask is None else _pad_axis(_pad_axis(_as_4d(mask), 2, qp, False), 3, kp, False)
  b4 = None if bias is None else _pad_axis(_pad_axis(_as_4d(bias), 2, qp), 3, kp)
  static = _Static(scale=scale, causal=bool(is_causal), kv_len=kv_len, qb=qb, kb=kb)
  out = _flash(static, q, k, v, b4, m4)
  return jnp.swapaxes(out[:, :, :q_len], 1, 2)


class _Static(NamedTuple):
  """Hashable static configuration of the chunked kernel."""
  scale: float
  causal: bool
  kv_len: int
  qb: int
  kb: int


def _block_valid(st, mask, i, j, kp):
  """Validity of block (i, j): padding keys, causality, user mask. None = all valid
  (decided statically, so unmasked attention pays for no select at all)."""
  qi0, kj0 = i * st.qb, j * st.kb
  valid = None
  if st.kv_len != kp:
    valid = kj0 + lax.broadcasted_iota(jnp.int32, (st.qb, st.kb), 1) < st.kv_len
  if st.causal:
    c = _causal(st.qb, st.kb, qi0, kj0)
    valid = c if valid is None else valid & c
  if mask is not None:
    m = _block(mask, qi0, st.qb, kj0, st.kb)
    valid = m if valid is None else valid & m
  return valid


def _masked(valid, x, fill):
  return x if valid is None else jnp.where(valid, x, fill)


def _block_logits(st, qi, kj, bias, i, j):
  """Logits of block (i, j); `qi` comes pre-multiplied by the scale."""
  s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32)
  if bias is not None:
    s = s + _block(bias, i * st.qb, st.qb, j * st.kb, st.kb).astype(jnp.float32)
  return s


def _block_needed(st, i, j):
  """False when a causal key block lies entirely above the diagonal."""
  return j * st.kb <= i * st.qb + st.qb - 1


def _flash_forward(st, q, k, v, bias, mask):
  b, h, qp, _ = q.shape
  dv = v.shape[-1]
  nq, nk = qp // st.qb, k.shape[2] // st.kb

  def q_block(i):
    qi = lax.dynamic_slice_in_dim(q, i * st.qb, st.qb, axis=2) * jnp.asarray(st.scale, q.dtype)

    def kv_step(carry, j):
      def compute(carry):
        m, l, acc = carry
        kj = lax.dynamic_slice_in_dim(k, j * st.kb, st.kb, axis=2)
        vj = lax.dynamic_slice_in_dim(v, j * st.kb, st.kb, axis=2)
        s = _masked(_block_valid(st, mask, i, j, k.shape[2]),
                    _block_logits(st, qi, kj, bias, i, j), -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + p.sum(axis=-1)
        pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vj,
                        preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

      if st.causal:
        return lax.cond(_block_needed(st, i, j), compute, lambda c: c, carry), None
      return compute(carry), None

    init = (jnp.full((b, h, st.qb), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, st.qb), jnp.float32),
            jnp.zeros((b, h, st.qb, dv), jnp.float32))
    (m, l, acc), _ = lax.scan(kv_step, init, jnp.arange(nk))
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out.astype(q.dtype), lse

  if nq == 1:
    return q_block(0)
  out, lse = lax.map(q_block, jnp.arange(nq))  # [nq, b, h, qb, ...]
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, qp, dv)
  lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, qp)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, bias, mask):
  return _flash_forward(st, q, k, v, bias, mask)[0]


def _flash_fwd(st, q, k, v, bias, mask):
  out, lse = _flash_forward(st, q, k, v, bias, mask)
  return out, (q, k, v, bias, mask, out, lse)


def _flash_bwd(st, res, g):
  q, k, v, bias, mask, out, lse = res
  b, h, qp, d = q.shape
  nq, nk = qp // st.qb, k.shape[2] // st.kb
  delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, h, qp]

  def kv_block(carry, j):
    kj = lax.dynamic_slice_in_dim(k, j * st.kb, st.kb, axis=2)
    vj = lax.dynamic_slice_in_dim(v, j * st.kb, st.kb, axis=2)

    def q_step(c, i):
      def compute(c):
        dk_j, dv_j, dq, dbias = c
        qi = lax.dynamic_slice_in_dim(q, i * st.qb, st.qb, axis=2)
        gi = lax.dynamic_slice_in_dim(g, i * st.qb, st.qb, axis=2)
        lse_i = lax.dynamic_slice_in_dim(lse, i * st.qb, st.qb, axis=2)
        delta_i = lax.dynamic_slice_in_dim(delta, i * st.qb, st.qb, axis=2)
        s = _block_logits(st, qi * jnp.asarray(st.scale, q.dtype), kj, bias, i, j)
        p = _masked(_block_valid(st, mask, i, j, k.shape[2]), jnp.exp(s - lse_i[..., None]),
                    0.0)
        dv_j = dv_j + jnp.einsum("bhqk,bhqd->bhkd", p.astype(g.dtype), gi,
                                 preferred_element_type=jnp.float32)
        dp = jnp.einsum("bhqd,bhkd->bhqk", gi, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_i[..., None])
        dq_i = jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), kj,
                          preferred_element_type=jnp.float32) * st.scale
        dq = lax.dynamic_update_slice_in_dim(
            dq, lax.dynamic_slice_in_dim(dq, i * st.qb, st.qb, axis=2) + dq_i, i * st.qb, 2)
        dk_j = dk_j + jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), qi,
                                 preferred_element_type=jnp.float32) * st.scale
        if dbias is not None:
          dbias = _accumulate_bias_grad(st, dbias, ds, i, j)
        return dk_j, dv_j, dq, dbias

      if st.causal:
        return lax.cond(_block_needed(st, i, j), compute, lambda c: c, c), None
      return compute(c), None

    dq, dbias = carry
    init = (jnp.zeros((b, h, st.kb, d), jnp.float32),
            jnp.zeros((b, h, st.kb, v.shape[-1]), jnp.float32), dq, dbias)
    (dk_j, dv_j, dq, dbias), _ = lax.scan(q_step, init, jnp.arange(nq))
    return (dq, dbias), (dk_j, dv_j)

  dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
  (dq, dbias), (dk, dv) = lax.scan(kv_block, (jnp.zeros(q.shape, jnp.float32), dbias0),
                                    jnp.arange(nk))
  dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
  dbias = None if bias is None else dbias.astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None


def _accumulate_bias_grad(st, dbias, ds, i, j):
  """Add the logit gradient of block (i, j), summed over bias's broadcast axes."""
  axes = tuple(a for a in range(4) if dbias.shape[a] == 1 and ds.shape[a] != 1)
  part = jnp.sum(ds, axis=axes, keepdims=True) if axes else ds
  qs = i * st.qb if dbias.shape[2] != 1 else 0
  ks = j * st.kb if dbias.shape[3] != 1 else 0
  cur = _block(dbias, qs, st.qb, ks, st.kb)
  return lax.dynamic_update_slice(dbias, cur + part, (0, 0, qs, ks))


_flash.defvjp(_flash_fwd, _flash_bwd)
