"""Embedding modules over packed low-bit tables."""
from .lowp import LowPrecisionEmbedding, LowPrecisionEmbeddingBag, two_pass_backward
from .mpe import (
                  MixedPrecisionEmbedding,
                  MixedPrecisionEmbeddingBag,
                  MixedPrecisionSearchEmbedding,
                  MixedPrecisionSearchEmbeddingBag,
                  retrain_model,
)
from .quantized import QuantizedEmbedding, QuantizedEmbeddingBag, quantize_

__all__ = ["LowPrecisionEmbedding", "LowPrecisionEmbeddingBag", "MixedPrecisionEmbedding",
           "MixedPrecisionEmbeddingBag", "MixedPrecisionSearchEmbedding",
           "MixedPrecisionSearchEmbeddingBag", "QuantizedEmbedding", "QuantizedEmbeddingBag",
           "quantize_", "retrain_model", "two_pass_backward"]
