"""Embedding modules over packed low-bit tables."""
from .lowp import LowPrecisionEmbedding, LowPrecisionEmbeddingBag, two_pass_backward
from .quantized import QuantizedEmbedding, QuantizedEmbeddingBag, quantize_

__all__ = ["LowPrecisionEmbedding", "LowPrecisionEmbeddingBag", "QuantizedEmbedding",
           "QuantizedEmbeddingBag", "quantize_", "two_pass_backward"]
