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
  * ``"chunked"``: memory-efficient (flash) attention in plain JAX, O(n) memory forward
    and backward, any lengths, causal blocks above the diagonal skipped
    (`chunked_attention.py`).
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

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels import chunked_attention, pallas_attention

IMPLEMENTATIONS = ("reference", "chunked", "xla", "cudnn", "pallas")
# Automatic choice: chunked once a head's logit matrix has this many entries (on this
# 2-core CPU chunked ties xla below 512² and wins above; bench/README.md).
CHUNKED_MIN_LOGITS = 512 * 512
DEFAULT_Q_BLOCK = 512
DEFAULT_KV_BLOCK = 512
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def size_bias(size):
  """Token sizes [batch, n] (how many input tokens each stands for, after token merging;
  0 = padding) -> the logit bias log(size) of proportional attention (ToMe): attending to
  a token of size s weighs as s copies of it. Padding gets 0 (its mask removes it)."""
  return jnp.where(size > 0, jnp.log(jnp.maximum(size, 1e-30)), 0.0)


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
    return chunked_attention.chunked(query, key, value, _as_4d(mask), _as_4d(bias), is_causal,
                                     scale, q_block_size or DEFAULT_Q_BLOCK,
                                     kv_block_size or DEFAULT_KV_BLOCK)
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


def _row_has_key(mask, is_causal, q_len, kv_len):
  """[b?, h?, q, 1] bool: does the query row see any key at all (None: always)."""
  if mask is None:
    return None  # a causal row always sees key 0
  m = _as_4d(mask)
  if is_causal:
    m = m & chunked_attention.causal(q_len, kv_len)
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
    c = chunked_attention.causal(q_len, kv_len)
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
