"""Every program lowers for GPU and TPU, checked on this CPU with `jax.export` (nothing runs
there): the dense and compressed train and eval steps of `tiny` and `small`, the int8 x
int8 -> int32 training path, the attention kernel's implementations (cuDNN's cannot be
lowered without cuDNN installed: asserted, so the day it can, this test says so). The
deploy artifact is lowered for cpu, cuda and tpu in test_quickstart.py."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from mmjax.cli import lowering
from mmjax.compress import activations
from mmjax.kernels import attention

PLATFORMS = ("cuda", "tpu")


def _config(module, arg):  # no run on disk: a self-distillation teacher is the student's model
  return importlib.import_module(f"experiments.configs.{module}").get_config(arg)


@pytest.mark.parametrize("module, arg", [
    ("dense", "tiny"), ("dense", ""),           # dense, tiny and small
    ("combined", "tiny"), ("combined", ""),     # distillation + pruning + int8 QAT
    ("qat", "tiny,int8"),                       # int8 x int8 -> int32, forward and backward
])
def test_train_and_eval_steps_lower_for_gpu_and_tpu(module, arg):
  res = lowering.check(_config(module, arg), PLATFORMS, log=lambda *_: None)
  assert set(res) == {(p, pl) for p in ("train_step", "eval_step") for pl in PLATFORMS}
  assert all(v is None for v in res.values()), res


def test_the_cpu_only_int8_transpose_is_replaced_on_accelerators():
  """The int8 backward's transpose is a gather on CPU only (XLA:CPU's fast int8 kernel)."""
  a = jax.ShapeDtypeStruct((6, 4), jnp.int8)
  text = {p: lowering.lower(activations._transposed, (a,), p).mlir_module()
          for p in ("cpu",) + PLATFORMS}
  assert "gather" in text["cpu"]
  assert all("gather" not in text[p] and "transpose" in text[p] for p in PLATFORMS)


@pytest.mark.parametrize("impl", ["reference", "chunked", "xla"])
def test_attention_implementations_lower_forward_and_backward(impl):
  q = jax.ShapeDtypeStruct((2, 48, 4, 32), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 80, 4, 32), jnp.bfloat16)  # cross-attention
  mask = jax.ShapeDtypeStruct((2, 1, 1, 80), jnp.bool_)

  def loss(q, k, v, m):
    out = attention.dot_product_attention(q, k, v, mask=m, implementation=impl,
                                          q_block_size=16, kv_block_size=32)
    return out.astype(jnp.float32).sum()
  grad = jax.grad(loss, argnums=(0, 1, 2))
  for p in PLATFORMS:
    lowering.lower(grad, (q, kv, kv, mask), p)


def test_cudnn_attention_cannot_be_lowered_without_cudnn():
  q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)
  f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(RuntimeError, match="cuDNN is not detected"):
    lowering.lower(f, (q, q, q), "cuda")
