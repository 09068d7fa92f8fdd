"""qembed: packed int-N embedding tables for PyTorch.

Fused gather-dequantize-pool lookups over 1- to 8-bit rows, drop-in modules for
``nn.EmbeddingBag`` and ``nn.Embedding``, :func:`quantize_` to convert a model in place, and
tables trained directly in low precision (:class:`LowPrecisionEmbeddingBag`).
"""
from . import data, formats, models, ops, reference
from .nn import (LowPrecisionEmbedding, LowPrecisionEmbeddingBag, QuantizedEmbedding,
                 QuantizedEmbeddingBag, quantize_, two_pass_backward)

__version__ = "0.1.0"
__all__ = ["data", "formats", "models", "ops", "reference", "LowPrecisionEmbedding",
           "LowPrecisionEmbeddingBag", "QuantizedEmbedding", "QuantizedEmbeddingBag",
           "quantize_", "two_pass_backward", "__version__"]
