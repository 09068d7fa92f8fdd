"""qembed: packed int-N embedding tables for PyTorch.

Fused gather-dequantize-pool lookups over 1- to 8-bit rows, drop-in modules for
``nn.EmbeddingBag`` and ``nn.Embedding``, and :func:`quantize_` to convert a model in place.
"""
from . import data, formats, models, ops, reference
from .nn import QuantizedEmbedding, QuantizedEmbeddingBag, quantize_

__version__ = "0.1.0"
__all__ = ["data", "formats", "models", "ops", "reference", "QuantizedEmbedding", "QuantizedEmbeddingBag",
           "quantize_", "__version__"]
