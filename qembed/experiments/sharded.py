"""The CTR experiment's models with their table sharded over processes by TorchRec's DMP
(``torchrun --nproc-per-node N -m qembed train ... --sharding row_wise``).

* :class:`FieldCollection`: ``nn.Embedding``'s interface (rows of one table for all fields,
  ids [B, F] -> [B, F, D]) over a :class:`~qembed.torchrec.LowPrecisionEmbeddingBagCollection`
  with one table per field, so the experiment's models run on it unchanged.
* :func:`shard_model`: the model under DMP, every field's table sharded one way
  (:class:`~qembed.torchrec.QEmbedSharder`), the dense layers data-parallel (DDP).
* :class:`RankShare`: a dataset whose batches are this process's share of each global batch,
  so N processes train on the 1-process run's batches: each loss is the mean over its share,
  DDP averages the dense gradients and TorchRec divides the tables' by N, which together are
  the gradients of the global batch's mean loss.

Every process evaluates the whole validation and test sets (the same batches on every rank,
as the sharded lookups need), so each computes the same AUC.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from ..torchrec.modules import LowPrecisionEmbeddingBagCollection
from ..torchrec.sharding import SHARDING_TYPES, QEmbedSharder


class FieldCollection(nn.Module):
    """One low-precision table per field behind ``nn.Embedding``'s forward: ids [B, F] are
    rows of the fields' tables stacked (field f's id i is row ``offsets[f] + i``, as the
    experiment's models number them); returns [B, F, D]. ``options`` are
    :class:`~qembed.torchrec.LowPrecisionEmbeddingBagCollection`'s (table f draws from
    ``seed + f``)."""

    def __init__(self, field_dims: list[int], embedding_dim: int, **options):
        super().__init__()
        self.field_dims = [int(d) for d in field_dims]
        self.keys = [f"field{f}" for f in range(len(self.field_dims))]
        configs = [EmbeddingBagConfig(num_embeddings=n, embedding_dim=embedding_dim,
                                      name=key, feature_names=[key], pooling=PoolingType.SUM)
                   for key, n in zip(self.keys, self.field_dims)]
        self.collection = LowPrecisionEmbeddingBagCollection(configs, **options)
        self.register_buffer("offsets", torch.tensor([0] + self.field_dims[:-1]).cumsum(0),
                             persistent=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        ids = (rows - self.offsets).t().reshape(-1)  # key-major: field 0's batch first
        kjt = KeyedJaggedTensor(keys=self.keys, values=ids,
                                lengths=torch.ones_like(ids))
        pooled = self.collection(kjt).to_dict()
        return torch.stack([pooled[key] for key in self.keys], dim=1)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed rows and steps this process holds (its shards, once sharded),
        as served: without the optimizer's state."""
        tables = self.collection.embedding_bags.values()
        modules = [m for t in tables for m in getattr(t, "shards", [t])]
        return sum(m.qweight.numel() + (4 * m.step.numel() if m.step is not None else 0)
                   for m in modules)


def shard_model(model: nn.Module, sharding: str) -> nn.Module:
    """`model` (whose ``embedding`` is a :class:`FieldCollection`) under DMP over the default
    process group: every table sharded by `sharding` (table-wise: whole tables dealt to the
    ranks, largest first, to even out their rows), the rest data-parallel."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        row_wise,
        table_row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan

    if sharding not in SHARDING_TYPES:
        raise ValueError(f"qembed: --sharding must be one of {list(SHARDING_TYPES)}, got "
                         f"{sharding!r}")
    world_size = dist.get_world_size()
    collection = model.embedding.collection
    configs = collection.embedding_bag_configs()
    held = [0] * world_size
    per_table = {}
    for c in sorted(configs, key=lambda c: -c.num_embeddings):
        if sharding == "table_wise":
            rank = held.index(min(held))
            held[rank] += c.num_embeddings
            per_table[c.name] = table_wise(rank=rank)
        else:
            per_table[c.name] = {"row_wise": row_wise, "table_row_wise":
                                 lambda: table_row_wise(host_index=0),
                                 "column_wise": lambda: column_wise(
                                     ranks=list(range(world_size)))}[sharding]()
    sharder = QEmbedSharder()
    plan = ShardingPlan({"embedding.collection": construct_module_sharding_plan(
        collection, per_table, sharder=sharder, local_size=world_size, world_size=world_size,
        device_type="cpu")})
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
                                    sharders=[sharder])


class RankShare:
    """This process's share of each of `data`'s batches (its consecutive block of samples);
    everything else is `data`'s."""

    def __init__(self, data):
        self.data = data
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size: int, *args, **kwargs):
        for x, y in self.data.batches(batch_size, *args, **kwargs):
            share = -(-x.shape[0] // self.world_size)
            rows = slice(self.rank * share, (self.rank + 1) * share)
            yield x[rows], y[rows]
