"""mmjax.kernels.attention against an independent float64 NumPy reference, forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mmjax.kernels.attention import choose_implementation, dot_product_attention
from reference_attention import attention_fwd_bwd

CPU_IMPLS = ("reference", "chunked", "xla")
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2}  # max error / max(1, max |reference|)


def _case(seed, b, nq, nk, h, d, *, mask_kind=None, bias_kind=None, empty_row=False):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, nq, h, d)).astype(np.float32)
  k = rng.normal(size=(b, nk, h, d)).astype(np.float32)
  v = rng.normal(size=(b, nk, h, d)).astype(np.float32)
  g = rng.normal(size=(b, nq, h, d)).astype(np.float32)
  mask = None
  if mask_kind == "full":
    mask = rng.random((b, h, nq, nk)) > 0.3
  elif mask_kind == "key_padding":
    lengths = rng.integers(1, nk + 1, size=b)
    mask = (np.arange(nk)[None, :] < lengths[:, None])[:, None, None, :]
  elif mask_kind == "per_query":  # [b, 1, q, k]
    mask = rng.random((b, 1, nq, nk)) > 0.5
  if empty_row and mask is not None:
    mask = np.array(np.broadcast_to(mask, (b, mask.shape[1], nq, nk)))
    mask[0, :, nq // 2, :] = False
  bias = None
  if bias_kind == "full":
    bias = rng.normal(size=(b, h, nq, nk)).astype(np.float32)
  elif bias_kind == "heads":
    bias = rng.normal(size=(h, nq, nk)).astype(np.float32)  # rank 3, broadcast over batch
  elif bias_kind == "keys":
    bias = rng.normal(size=(b, 1, 1, nk)).astype(np.float32)
  return q, k, v, g, mask, bias


def _run(impl, q, k, v, g, mask, bias, causal, dtype=jnp.float32, blocks=(16, 16)):
  def f(q, k, v, bias):
    return dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=causal,
                                 implementation=impl, q_block_size=blocks[0],
                                 kv_block_size=blocks[1])

  args = [jnp.asarray(x, dtype) for x in (q, k, v)]
  args.append(None if bias is None else jnp.asarray(bias, dtype))
  out, vjp = jax.vjp(jax.jit(f), *args)
  grads = vjp(jnp.asarray(g, dtype))
  return out, grads


def _assert_close(got, want, tol, what):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
  assert err <= tol, f"{what}: relative max error {err:.2e} > {tol:.0e}"


CASES = [
    # seed, b, nq, nk, h, d, mask, bias, causal, empty_row
    (0, 2, 37, 53, 3, 8, None, None, False, False),      # cross-attention, odd lengths
    (1, 1, 50, 50, 2, 16, None, None, True, False),      # causal, not a block multiple
    (2, 2, 33, 70, 2, 8, "key_padding", None, False, False),
    (3, 2, 21, 45, 3, 4, "full", "full", False, True),   # a fully masked query row
    (4, 1, 48, 48, 2, 8, "per_query", "heads", True, True),
    (5, 3, 17, 9, 1, 12, None, "keys", False, False),    # fewer keys than queries
    (6, 1, 1, 31, 2, 8, "key_padding", None, False, False),  # a single query
]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_matches_float64_reference(impl, case):
  seed, b, nq, nk, h, d, mask_kind, bias_kind, causal, empty = case
  q, k, v, g, mask, bias = _case(seed, b, nq, nk, h, d, mask_kind=mask_kind,
                                 bias_kind=bias_kind, empty_row=empty)
  want = attention_fwd_bwd(q, k, v, g, mask=mask, bias=bias, causal=causal)
  out, grads = _run(impl, q, k, v, g, mask, bias, causal)
  tol = TOL[jnp.float32]
  for name, got, ref in zip(("out", "dq", "dk", "dv", "dbias"), (out,) + tuple(grads), want):
    if ref is None:
      assert got is None
      continue
    _assert_close(got, ref, tol * (5 if name != "out" else 1), f"{impl} {name}")
  if empty:
    assert np.all(np.asarray(out)[0, nq // 2] == 0.0), "a fully masked row must be zeros"


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bfloat16_with_looser_tolerance(impl):
  q, k, v, g, mask, bias = _case(7, 2, 40, 29, 2, 16, mask_kind="key_padding",
                                 bias_kind="heads")
  want = attention_fwd_bwd(*(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
                             for x in (q, k, v, g)), mask=mask,
                           bias=np.asarray(jnp.asarray(bias, jnp.bfloat16), np.float64))
  out, grads = _run(impl, q, k, v, g, mask, bias, False, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  for name, got, ref in zip(("out", "dq", "dk", "dv", "dbias"), (out,) + tuple(grads), want):
    _assert_close(got, ref, TOL[jnp.bfloat16] * (2 if name != "out" else 1), f"{impl} {name}")


def test_chunked_block_sizes_do_not_change_the_result():
  q, k, v, g, mask, bias = _case(8, 1, 70, 90, 2, 8, mask_kind="key_padding")
  outs = [_run("chunked", q, k, v, g, mask, None, True, blocks=bl)[0]
          for bl in ((8, 8), (13, 32), (512, 512))]
  for o in outs[1:]:
    np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), atol=2e-6)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_all_masked_gives_zeros_and_finite_gradients(impl):
  q, k, v, g, _, _ = _case(9, 2, 8, 12, 2, 4)
  mask = np.zeros((2, 1, 1, 12), bool)
  out, grads = _run(impl, q, k, v, g, mask, None, False)
  assert np.all(np.asarray(out) == 0.0)
  for x in grads[:3]:
    assert np.all(np.isfinite(np.asarray(x))) and np.all(np.asarray(x) == 0.0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_composes_with_vmap_jit_grad(impl):
  rng = np.random.default_rng(10)
  q = jnp.asarray(rng.normal(size=(3, 2, 11, 2, 4)), jnp.float32)  # extra leading axis
  k = jnp.asarray(rng.normal(size=(3, 2, 13, 2, 4)), jnp.float32)
  f = lambda q, k: dot_product_attention(q, k, k, implementation=impl, q_block_size=4,
                                         kv_block_size=4)
  batched = jax.jit(jax.vmap(f))(q, k)
  looped = jnp.stack([f(q[i], k[i]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), atol=1e-6)
  grad = jax.jit(jax.grad(lambda q, k: jax.vmap(f)(q, k).sum() ** 2))(q, k)
  want = attention_fwd_bwd(q[0], k[0], k[0], np.ones(q[0].shape) * 2 * float(batched.sum()))
  _assert_close(grad[0], want[1], 1e-4, "vmap grad dq")


@settings(max_examples=8, deadline=None)
@given(nq=st.integers(1, 24), nk=st.integers(1, 24), causal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_chunked_random_shapes(nq, nk, causal, seed):
  q, k, v, g, mask, _ = _case(seed, 1, nq, nk, 2, 4, mask_kind="key_padding")
  want = attention_fwd_bwd(q, k, v, g, mask=mask, causal=causal)
  out, grads = _run("chunked", q, k, v, g, mask, None, causal, blocks=(8, 8))
  for name, got, ref in zip(("out", "dq", "dk", "dv"), (out,) + tuple(grads[:3]), want):
    _assert_close(got, ref, 1e-4, name)


def test_automatic_choice_rule():
  if jax.default_backend() == "cpu":
    assert choose_implementation(64, 64, 32, jnp.float32) == "xla"
    assert choose_implementation(4096, 4096, 64, jnp.float32) == "chunked"
    assert choose_implementation(64, 64, 32, jnp.bfloat16) == "xla"


# ----------------------------------------------------------------------------- bad input

def _shapes(**kw):
  base = dict(q=(2, 5, 2, 4), k=(2, 7, 2, 4), v=(2, 7, 2, 4))
  base.update(kw)
  return [jnp.zeros(base[n]) for n in ("q", "k", "v")]


@pytest.mark.parametrize("kwargs,shapes,needle", [
    ({}, dict(q=(5, 2, 4)), "query must have rank 4"),
    ({}, dict(k=(2, 7, 2, 8), v=(2, 7, 2, 8)), "head_dim mismatch"),
    ({}, dict(k=(2, 7, 3, 4), v=(2, 7, 3, 4)), "head counts differ"),
    ({}, dict(v=(2, 6, 2, 4)), "key and value lengths differ"),
    ({}, dict(k=(3, 7, 2, 4), v=(3, 7, 2, 4)), "batch sizes differ"),
    (dict(mask=np.ones((2, 1, 5, 6), bool)), {}, "mask of shape (2, 1, 5, 6)"),
    (dict(mask=np.ones((2, 1, 5, 7), np.float32)), {}, "mask must be boolean"),
    (dict(bias=np.ones((3, 5, 7))), {}, "bias of shape (3, 5, 7)"),
    (dict(implementation="flash"), {}, "implementation must be one of"),
])
def test_bad_input_raises_at_trace_time(kwargs, shapes, needle):
  q, k, v = _shapes(**shapes)
  traced = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, **kwargs))
  with pytest.raises(ValueError) as err:
    traced.lower(q, k, v)  # tracing only: nothing is compiled
  assert needle in str(err.value)


def test_cudnn_on_cpu_is_a_clear_error():
  if jax.default_backend() == "gpu":
    pytest.skip("cuDNN is available here")
  q, k, v = _shapes()
  with pytest.raises(ValueError, match="needs a CUDA GPU"):
    dot_product_attention(q, k, v, implementation="cudnn")
