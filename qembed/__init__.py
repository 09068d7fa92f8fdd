"""qembed: packed int-N embedding tables for PyTorch.

Fused gather-dequantize-pool lookups over 1- to 8-bit rows, drop-in modules for
``nn.EmbeddingBag`` and ``nn.Embedding``, :func:`quantize_` to convert a model in place, and
tables trained directly in low precision (:class:`LowPrecisionEmbeddingBag`), and
mixed-precision tables searched per frequency group (:mod:`qembed.mpe`). The CTR experiment
lives apart, in :mod:`qembed.experiments`.
"""
from importlib import metadata

from . import formats, mpe, ops, reference
from .nn import (
                 LowPrecisionEmbedding,
                 LowPrecisionEmbeddingBag,
                 MixedPrecisionEmbedding,
                 MixedPrecisionEmbeddingBag,
                 MixedPrecisionSearchEmbedding,
                 MixedPrecisionSearchEmbeddingBag,
                 QuantizedEmbedding,
                 QuantizedEmbeddingBag,
                 quantize_,
                 retrain_model,
                 two_pass_backward,
)

try:
    __version__ = metadata.version("qembed")  # written once, in pyproject.toml
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["formats", "mpe", "ops", "reference", "LowPrecisionEmbedding",
           "LowPrecisionEmbeddingBag", "MixedPrecisionEmbedding", "MixedPrecisionEmbeddingBag",
           "MixedPrecisionSearchEmbedding", "MixedPrecisionSearchEmbeddingBag",
           "QuantizedEmbedding", "QuantizedEmbeddingBag", "quantize_", "retrain_model",
           "two_pass_backward", "__version__"]
