"""The "chunked" implementation of `mmjax.kernels.attention`: memory-efficient (flash) attention
in plain JAX, for any backend.

Queries in blocks (``lax.map``), keys in blocks (``lax.scan``) with an online softmax; a
``custom_vjp`` backward recomputes each block from the saved log-sum-exp, so forward and
backward need O(n) memory. Lengths need not divide the block sizes (inputs are padded,
padding masked out). With ``is_causal``, key blocks entirely above the diagonal are
skipped. Argument checks, the automatic choice and the zeroing of rows that see no key
stay in `attention.py`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def causal(q_len, kv_len, q_offset=0, k_offset=0):
  """[q_len, kv_len] bool: key j may be seen by query i (j <= i), for the block whose first
  query and key are at the offsets (the whole matrix at offset 0)."""
  qi = q_offset + lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 0)
  kj = k_offset + lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 1)
  return kj <= qi


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


def chunked(query, key, value, mask, bias, is_causal, scale, q_block, kv_block):
  """Attention over [b, len, h, d] inputs with 4-d (or None) `mask` and `bias`."""
  b, q_len, h, _ = query.shape
  kv_len = key.shape[1]
  qb = min(q_block, q_len)
  kb = min(kv_block, kv_len)
  qp, kp = _round_up(q_len, qb), _round_up(kv_len, kb)
  # [b, h, len, d] layout once, so every block product is a plain batched matmul.
  q = _pad_axis(jnp.swapaxes(query, 1, 2), 2, qp)
  k = _pad_axis(jnp.swapaxes(key, 1, 2), 2, kp)
  v = _pad_axis(jnp.swapaxes(value, 1, 2), 2, kp)
  m4 = None if mask is None else _pad_axis(_pad_axis(mask, 2, qp, False), 3, kp, False)
  b4 = None if bias is None else _pad_axis(_pad_axis(bias, 2, qp), 3, kp)
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
    c = causal(st.qb, st.kb, qi0, kj0)
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
