"""JAX's Pallas attention kernels behind mmjax's semantics (`mmjax/kernels/pallas_attention.py`),
run in Pallas interpret mode on this CPU against the float64 NumPy reference: forward and
gradients, odd lengths, masks, cross-attention, empty rows; `implementation="pallas"`
lowers to the TPU kernel for tpu and the Triton kernel for cuda."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mmjax.cli import lowering
from mmjax.kernels import attention, pallas_attention
from reference_attention import attention_fwd_bwd
from test_attention import _assert_close, _case


def _check(kernel, case, causal, tol=2e-5, tpu=False):
  q, k, v, g, mask, bias = case
  want = attention_fwd_bwd(q, k, v, g, mask=mask, bias=bias, causal=causal)
  scale = 1.0 / np.sqrt(q.shape[-1])
  m4 = None if mask is None else jnp.asarray(mask)

  def f(q, k, v):
    b4 = None if bias is None else attention._as_4d(jnp.asarray(bias))
    out = kernel(q, k, v, m4, b4, causal, scale)
    return attention._zero_empty_rows(out, m4, causal, k.shape[1])
  # interpret mode on this CPU: the TPU kernel under this context, the GPU one by its flag
  with pltpu.force_tpu_interpret_mode() if tpu else contextlib.nullcontext():
    out, vjp = jax.vjp(jax.jit(f), *(jnp.asarray(x) for x in (q, k, v)))
    grads = vjp(jnp.asarray(g))
  for name, got, ref in zip(("out", "dq", "dk", "dv"), (out,) + tuple(grads), want):
    _assert_close(got, ref, tol, name)


TPU = pallas_attention.tpu_flash
GPU = lambda q, k, v, m, b, c, s: pallas_attention.gpu_mha(q, k, v, m, c, s, interpret=True)


@pytest.mark.parametrize("nq, nk, mask_kind, bias_kind, causal, empty", [
    (40, 72, "key_padding", None, False, False),   # cross-attention, odd lengths
    (33, 33, None, None, True, False),             # causal self-attention
    (24, 40, "per_query", "heads", False, True),   # a general mask and a bias, an empty row
])
def test_tpu_flash_attention_matches_the_reference(nq, nk, mask_kind, bias_kind, causal, empty):
  case = _case(1, 2, nq, nk, 2, 8, mask_kind=mask_kind, bias_kind=bias_kind,
               empty_row=empty)
  _check(TPU, case, causal, tpu=True)


@pytest.mark.parametrize("nq, nk, mask_kind, causal", [
    (40, 72, "key_padding", False),    # cross-attention, odd lengths
    (20, 20, "key_padding", True),     # causal with padded keys
    (17, 9, None, False),
])
def test_gpu_attention_matches_the_reference(nq, nk, mask_kind, causal):
  _check(GPU, _case(2, 2, nq, nk, 2, 8, mask_kind=mask_kind), causal)


def test_pallas_lowers_to_each_platforms_kernel_and_computes_with_xla_on_cpu():
  q = jax.ShapeDtypeStruct((2, 40, 2, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((2, 72, 2, 64), jnp.float32)
  mask = jax.ShapeDtypeStruct((2, 1, 1, 72), jnp.bool_)
  f = lambda q, k, v, m: attention.dot_product_attention(q, k, v, mask=m,
                                                         implementation="pallas")
  grad = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))
  tpu = lowering.lower(grad, (q, kv, kv, mask), "tpu").mlir_module()
  cuda = lowering.lower(grad, (q, kv, kv, mask), "cuda").mlir_module()
  assert "tpu_custom_call" in tpu and "triton" not in tpu
  assert "triton" in cuda and "tpu_custom_call" not in cuda
  # on CPU no Pallas kernel runs compiled: "pallas" computes with xla
  q, k, v, g, m, _ = _case(3, 2, 40, 72, 2, 8, mask_kind="key_padding")
  want = attention_fwd_bwd(q, k, v, g, mask=m)[0]
  _assert_close(f(*(jnp.asarray(x) for x in (q, k, v, m))), want, 2e-5, "cpu pallas")
  assert attention.choose_implementation(4096, 4096, 64, jnp.float32) == "chunked"
