"""Embedding modules over packed low-bit tables."""
from .quantized import QuantizedEmbedding, QuantizedEmbeddingBag, quantize_

__all__ = ["QuantizedEmbedding", "QuantizedEmbeddingBag", "quantize_"]
