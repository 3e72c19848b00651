"""mmjax: compression experiments on multimodal transformers in JAX/Flax."""
from mmjax.kernels.attention import dot_product_attention

__all__ = ["dot_product_attention"]
__version__ = "0.1.0"
