"""qembed's tables behind TorchRec's interface: collections built from
``List[EmbeddingBagConfig]`` that take a ``KeyedJaggedTensor`` and return a ``KeyedTensor``,
every table looked up by one call of ``qembed.ops.embedding_bags``, and their sharder for
TorchRec's ``DistributedModelParallel`` (:mod:`qembed.torchrec.sharding`).

Importing this package needs TorchRec (``pip install qembed[torchrec]``); ``import qembed``
does not.
"""
try:
    import torchrec  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without TorchRec
    raise ImportError("qembed.torchrec needs TorchRec: pip install torchrec (with "
                      "fbgemm-gpu-cpu on CPU-only machines)") from e

from .modules import LowPrecisionEmbeddingBagCollection, QuantizedEmbeddingBagCollection
from .sharding import QEmbedSharder, ShardedQEmbeddingBagCollection

__all__ = ["LowPrecisionEmbeddingBagCollection", "QEmbedSharder", "QuantizedEmbeddingBagCollection",
           "ShardedQEmbeddingBagCollection"]
