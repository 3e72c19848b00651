"""The Pallas low-bit matmul (`compress/lowbit_matmul.py`) in interpret mode against a
float64 NumPy product of the dequantized codes: 4- and 8-bit, symmetric and zero-point
centres, groups (ragged too) and per channel, odd sizes; lowered for cuda (Triton) and
tpu (Mosaic)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.cli import lowering
from mmjax.compress import bitpack, lowbit_matmul


def _case(bits, m, k, n, group, seed=0):
  r = np.random.default_rng(seed)
  u = r.integers(0, 2 ** bits, size=(k, n)).astype(np.uint8)
  groups = -(-k // group)
  scale = r.uniform(0.01, 0.1, size=(groups, n)).astype(np.float32)
  center = r.integers(0, 2 ** bits, size=(groups, n)).astype(np.float32)
  x = r.normal(size=(m, k)).astype(np.float32)
  rows = lambda a: np.repeat(a, group, axis=0)[:k].astype(np.float64)
  want = x.astype(np.float64) @ ((u - rows(center)) * rows(scale))
  return (x, bitpack.pack(u, bits), scale, center), want


@pytest.mark.parametrize("bits, m, k, n, group", [
    (4, 5, 96, 40, 32),      # groups of 32
    (4, 7, 100, 6, 32),      # a ragged last group, odd rows
    (4, 64, 128, 352, 128),  # small's MLP shape, one group a column (per channel)
    (8, 3, 352, 128, 352),   # 8-bit per channel
    (8, 9, 64, 24, 16),
])
def test_kernel_matches_the_dequantized_product(bits, m, k, n, group):
  args, want = _case(bits, m, k, n, group)
  got = lowbit_matmul.matmul(*map(jnp.asarray, args), bits=bits, group=group, n=n,
                             interpret=True)
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * scale)
  ref = lowbit_matmul.product(*map(jnp.asarray, args), bits=bits, group=group, n=n)  # CPU
  np.testing.assert_allclose(np.asarray(ref), want, rtol=0, atol=2e-6 * scale)


def test_kernel_lowers_for_gpu_and_tpu():
  for bits, (m, k, n, group) in ((4, (64, 128, 352, 128)), (8, (64, 352, 128, 352))):
    args = (jax.ShapeDtypeStruct((m, k), jnp.float32),
            jax.ShapeDtypeStruct((k * n * bits // 8,), jnp.uint8),
            jax.ShapeDtypeStruct((-(-k // group), n), jnp.float32),
            jax.ShapeDtypeStruct((-(-k // group), n), jnp.float32))
    f = functools.partial(lowbit_matmul.product, bits=bits, group=group, n=n)
    assert "triton" in lowering.lower(f, args, "cuda").mlir_module()
    assert "tpu_custom_call" in lowering.lower(f, args, "tpu").mlir_module()
    cpu = lowering.lower(f, args, "cpu").mlir_module()
    assert "triton" not in cpu and "tpu_custom_call" not in cpu
  with pytest.raises(ValueError, match="4- or 8-bit codes"):
    lowbit_matmul.matmul(jnp.ones((2, 8)), jnp.ones((12,), jnp.uint8), jnp.ones((1, 4)),
                         jnp.ones((1, 4)), bits=3, group=8, n=4, interpret=True)
