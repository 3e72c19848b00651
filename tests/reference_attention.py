"""Independent float64 NumPy attention: forward and hand-derived backward."""
import numpy as np


def attention_fwd_bwd(q, k, v, g, *, mask=None, bias=None, causal=False, scale=None):
  """q [b,q,h,d], k/v [b,k,h,d], cotangent g like the output. Returns (out, dq, dk, dv, dbias)."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  b, nq, h, d = q.shape
  nk = k.shape[1]
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  qt, kt, vt, gt = (x.transpose(0, 2, 1, 3) for x in (q, k, v, g))  # [b,h,len,d]
  s = np.einsum("bhqd,bhkd->bhqk", qt, kt) * scale
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  valid = np.ones((b, h, nq, nk), bool)
  if mask is not None:
    valid = valid & np.broadcast_to(np.asarray(mask, bool), valid.shape)
  if causal:
    valid = valid & np.tril(np.ones((nq, nk), bool))
  any_row = valid.any(-1, keepdims=True)
  s = np.where(valid, s, -np.inf)
  smax = np.where(any_row, s.max(-1, keepdims=True), 0.0)
  e = np.where(valid, np.exp(s - smax), 0.0)
  p = e / np.where(any_row, e.sum(-1, keepdims=True), 1.0)
  out = np.einsum("bhqk,bhkd->bhqd", p, vt)
  dv = np.einsum("bhqk,bhqd->bhkd", p, gt)
  dp = np.einsum("bhqd,bhkd->bhqk", gt, vt)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bhqk,bhkd->bhqd", ds, kt) * scale
  dk = np.einsum("bhqk,bhqd->bhkd", ds, qt) * scale
  dbias = None
  if bias is not None:
    bshape = np.shape(bias)
    full = (1,) * (4 - len(bshape)) + tuple(bshape)
    axes = tuple(i for i in range(4) if full[i] == 1)
    dbias = ds.sum(axis=axes, keepdims=True).reshape(bshape)
  back = lambda x: x.transpose(0, 2, 1, 3)
  return back(out), back(dq), back(dk), back(dv), dbias
