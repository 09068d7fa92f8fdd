"""qembed's collections sharded by TorchRec's ``DistributedModelParallel`` (DMP).

``QEmbedSharder`` shards a :class:`~qembed.torchrec.LowPrecisionEmbeddingBagCollection`
(training) or a :class:`~qembed.torchrec.QuantizedEmbeddingBagCollection` (inference)
table-wise, row-wise, column-wise or table-row-wise, on CPU (gloo) and CUDA (nccl)::

    model = DistributedModelParallel(model, sharders=[QEmbedSharder()], plan=plan)

TorchRec moves the features to the ranks that hold their tables and the pooled rows back
(its input and output distributions are used as they are); on each rank, every local shard
of every table is looked up by one call of :func:`qembed.ops.embedding_bags`, and in
training the fused low-precision update of the local shards runs inside backward, as in the
unsharded collection.

**Same bits as one process.** A shard is a table of its own whose stochastic rounding and
initial values are keyed by its rows' and columns' places in the whole table (the ops'
``row_offset`` and ``column_offset``), and whose update counter advances with every step
as the whole table's does. The gradients a shard receives are those of the unsharded
collection: TorchRec divides the pooled outputs' gradients by the world size, as DDP
averages the dense ones, so each rank's loss is the mean over its own batch, and every
lookup of a row on any rank reaches the rank holding it, in the order of the global batch
(rank 0's samples first). So with the same seed, batches and options, N-process training
gives the codes, steps, optimizer state and counters of 1-process training over the
concatenated batches, bit for bit, wherever nothing the update reads is split:

* table-wise, row-wise and table-row-wise: always, except a learned per-table step;
* column-wise: with per-element optimizers (``"sgd"``, ``"adam"``) and fixed steps
  (``learn_step=False``).

What a sharding splits is kept **one per shard**, as TorchRec keeps row-wise Adagrad's
state per column shard, never reduced across ranks: under column-wise sharding each shard
keeps its own row-wise Adagrad accumulator (the mean square of its columns' gradients) and
its own per-row steps (learned from its columns); a learned per-table step becomes one step
per shard, learned from the shard's rows (or columns). Training is then close to, not the
same as, one process.

**Forward.** Table-wise and column-wise lookups pool as the unsharded op does. Row-wise and
table-row-wise shards pool each bag's rows that they hold and TorchRec adds the partial sums
across ranks, so a bag whose ids fall on several shards may differ from the unsharded
lookup in the last bits (float addition in another order); bags within one shard, and
one-id bags, are bit-identical. Mean pooling of row-split tables divides the summed bag by
its length afterwards, multiplying by 1 / length as the unsharded op does. (TorchRec 1.8's
own sharded collection gets this wrong when a collection mixes a table-wise table with sum
pooling and a row-wise table with mean pooling: its divisor leaves only the row-wise sum
features at 1, so the table-wise sum table comes back divided by its bag lengths. The
divisor here is built per output column and tested on that mix.) Per-sample weights are
inputs, not trained, under sharding (TorchRec's input distribution carries no gradient).

**Checkpoints.** ``state_dict`` has the unsharded collection's keys. Row-split tables
(table-wise, row-wise, table-row-wise) give every per-row buffer (``qweight``, ``state``,
per-row ``step_state``) as a ``ShardedTensor`` of the unsharded shape, so
``torch.distributed.checkpoint`` saves a sharded model and loads it into any other world
size or row split, into a DMP model or into the unsharded collection, and back. Column-wise
tables give each column shard's buffers stacked (shard j's rows at ``[j R, (j + 1) R)``):
they reload into any world size with the same column split. Steps, counters and seeds are
plain tensors on the ranks that hold the table (per-shard steps, where learned, a
``ShardedTensor`` with one entry per shard); ``nonfinite_rows`` counts the rows this rank's
shards skipped. ``load_state_dict`` also takes the unsharded collection's plain state dict,
each rank keeping its part.

**Inference.** The sharded module serves under ``torch.no_grad()`` with the same lookups.
The other road is TorchRec's own inference stack: a table trained here, converted for
TorchRec's ``QuantEmbeddingBagCollection`` (qembed's FBGEMM interchange), is sharded by
TorchRec's inference sharders.

**Faults.** Each rank checks its batch's ids against their tables before anything is sent;
an id outside its table raises there, naming the feature, table and id. The other ranks then
wait in the next collective, which fails once the process group's timeout (stated in the
error) expires, or at once where the failing process exits. Likewise a rank that dies makes
the others fail within the process group's timeout.
"""
from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .. import ops
from ..formats import code_bytes, param_offset, row_bytes
from ..nn.lowp import LowPrecisionEmbeddingBag, _LowPrecisionTable
from ..nn.quantized import QuantizedEmbeddingBag
from .modules import (
    _POOLING,
    LowPrecisionEmbeddingBagCollection,
    QuantizedEmbeddingBagCollection,
    backward_update_tables,
    table_args,
)

SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value,
                  ShardingType.COLUMN_WISE.value, ShardingType.TABLE_ROW_WISE.value)
# Shardings whose ranks each pool part of a bag's rows, added up by the output distribution.
_ROW_SPLIT_POOLING = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
# The options a shard of a training table is rebuilt with.
_TRAIN_OPTIONS = ("bits", "optimizer", "lr", "eps", "weight_decay", "betas", "learn_step",
                  "step_grad", "step_lr", "step_optimizer", "step_per", "rounding",
                  "init_std", "fused_update")


# --- one table's shard on this rank ------------------------------------------------------

def _empty_shard(source: nn.Module, rows: int, cols: int, row0: int, col0: int,
                 device) -> nn.Module:
    """A table of `source`'s kind and options holding its rows [row0, row0 + rows) and
    columns [col0, col0 + cols), allocated on `device`; codes and steps not yet filled."""
    if isinstance(source, _LowPrecisionTable):
        seed = source._counters()[0]
        options = {name: getattr(source, name) for name in _TRAIN_OPTIONS}
        shard = LowPrecisionEmbeddingBag(rows, cols, mode=source.mode, include_last_offset=True,
                                         device="meta", dtype=source.output_dtype, seed=seed,
                                         **options).to_empty(device=device)
        with torch.no_grad():
            for t in (shard.state, shard.step_state, shard.num_updates, shard.nonfinite_rows):
                t.zero_()
            shard.seed.fill_(seed)
        shard._host_counters = None
        shard.row_offset, shard.column_offset = row0, col0
    else:
        # Its values come from the sharded table: the seed its constructor draws from torch's
        # generator would only move that generator, so the draw is undone.
        with torch.random.fork_rng(devices=[]):
            shard = QuantizedEmbeddingBag(rows, cols, mode=source.mode, include_last_offset=True,
                                          device="meta", dtype=source.output_dtype,
                                          bits=source.bits, format=source.format
                                          ).to_empty(device=device)
    shard.full_size = (source.num_embeddings, source.embedding_dim)
    return shard


def _per_row_buffers(shard: nn.Module) -> set[str]:
    """The shard's buffers with one row per table row."""
    names = {"qweight"}
    if isinstance(shard, _LowPrecisionTable):
        names.add("state")
        if shard.step_per == "row":
            names.add("step_state")
    return names


def _slice_full(name: str, full: torch.Tensor, shard: nn.Module, row_offset: int,
                column_offset: int) -> torch.Tensor:
    """The part of the unsharded table's buffer `name` that `shard` holds: its rows and,
    for packed rows and Adam's moments, its columns (codes by whole groups of 8, the row's
    inline step, scale or bias kept)."""
    if name not in _per_row_buffers(shard):
        return full
    rows = full[row_offset: row_offset + shard.num_embeddings]
    dim, cols = shard.full_size[1], shard.embedding_dim
    if name == "qweight":
        bits, fmt = shard.bits, shard.format
        first = code_bytes(column_offset, bits)
        local = rows.new_zeros(rows.shape[0], row_bytes(cols, bits, fmt))
        local[:, :code_bytes(cols, bits)] = rows[:, first: first + code_bytes(cols, bits)]
        local[:, param_offset(cols, bits):] = rows[:, param_offset(dim, bits):]
        return local
    if name == "state" and shard.optimizer == "adam":  # [m | v]
        return torch.cat([rows[:, column_offset: column_offset + cols],
                          rows[:, dim + column_offset: dim + column_offset + cols]], dim=1)
    return rows


class _TableShards(nn.Module):
    """One table's shards held by this rank (several only under column-wise sharding),
    with where each sits in the table: its index among all the table's shards (ordered by
    row, then column) and its first row and column."""

    def __init__(self):
        super().__init__()
        self.shards = nn.ModuleList()
        self.places: list[tuple[int, int, int]] = []  # (index, first row, first column)


# --- the lookup of one sharding type ------------------------------------------------------

class _ShardLookupFunction(torch.autograd.Function):
    """The lookup of a rank's shards whose backward updates them (the unsharded
    collection's _CollectionLookup, per rank). Input: an empty tensor that requires grad, so
    that autograd reaches this node."""

    @staticmethod
    def forward(ctx, anchor, lookup, values, offsets, weights):
        ctx.lookup = lookup
        ctx.save_for_backward(values, offsets, weights)
        return lookup._pool(values, offsets, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        values, offsets, weights = ctx.saved_tensors
        lookup = ctx.lookup
        backward_update_tables(lookup.tables, table_args(lookup.tables), grad_out,
                               lookup.feature_tables, lookup.feature_columns, lookup.poolings,
                               values, offsets, weights)
        return None, None, None, None, None


class _ShardLookup(nn.Module):
    """Looks up the features TorchRec's input distribution hands this rank for one sharding
    type, in its order (group by group, table by table, each table's features in order),
    and returns their pooled rows side by side, fp32, as TorchRec's lookups do. Row-split
    shardings pool by sum: their output distribution adds the ranks' partial bags and the
    sharded collection applies the mean."""

    def __init__(self, tables: list[tuple[nn.Module, list[str], str]], row_split: bool):
        super().__init__()
        self.tables = [m for m, _, _ in tables]  # registered under the collection's tables
        self.feature_names, self.feature_tables, self.feature_columns, self.poolings = \
            [], [], [], []
        column = 0
        for t, (m, features, pooling) in enumerate(tables):
            for name in features:
                self.feature_names.append(name)
                self.feature_tables.append(t)
                self.feature_columns.append(column)
                self.poolings.append("sum" if row_split else pooling)
                column += m.embedding_dim
        self.training_tables = bool(self.tables) and isinstance(self.tables[0], _LowPrecisionTable)

    def _pool(self, values, offsets, weights) -> torch.Tensor:
        tables, steps, bits, dims, formats = table_args(self.tables)
        return ops.embedding_bags(tables, steps, bits, dims, formats, self.feature_tables,
                                  self.feature_columns, self.poolings, values, offsets, weights,
                                  torch.float32)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if not self.tables:
            # As TorchRec's empty lookups: the output requires grad, so that every rank's
            # backward runs the same collectives in the same order.
            return torch.zeros(features.stride(), 0, device=features.device(),
                               requires_grad=torch.is_grad_enabled())
        if features.keys() != self.feature_names:
            raise RuntimeError(f"qembed: the sharded lookup expected the features "
                               f"{self.feature_names}, got {features.keys()}")
        values, offsets = features.values(), features.offsets()
        weights = features.weights_or_none()
        weights = None if weights is None else weights.detach().float()
        if self.training_tables and torch.is_grad_enabled():
            anchor = torch.empty(0, device=values.device, requires_grad=True)
            return _ShardLookupFunction.apply(anchor, self, values, offsets, weights)
        return self._pool(values, offsets, weights)


# --- ShardedTensor helpers ------------------------------------------------------------------

def _sharded_tensor(pieces: list[tuple[list[int], list[int], object]],
                    local: dict[int, torch.Tensor], size: list[int], dtype: torch.dtype,
                    pg) -> ShardedTensor:
    """A ShardedTensor of `size` made of `pieces` (offsets, sizes, placement), piece i held
    here as local[i]."""
    metas = [ShardMetadata(shard_offsets=list(o), shard_sizes=list(s), placement=p)
             for o, s, p in pieces]
    shards = [Shard(tensor=local[i], metadata=metas[i]) for i in sorted(local)]
    meta = ShardedTensorMetadata(shards_metadata=metas, size=torch.Size(size),
                                 tensor_properties=TensorProperties(dtype=dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta,
                                                                      process_group=pg)


def _pg_timeout(pg, device: torch.device) -> str:
    """The process group's timeout, for messages."""
    try:
        backend = pg._get_backend(torch.device(device.type))
        return f"{backend.options._timeout.total_seconds():g} s"
    except (AttributeError, RuntimeError):
        return "its timeout"


# --- the sharded collection -----------------------------------------------------------------

class ShardedQEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """A qembed collection sharded by DMP (see the module's documentation): TorchRec's
    ``ShardedEmbeddingBagCollection`` with qembed's tables, lookups, state dict and mean
    pooling."""

    def __init__(self, module, table_name_to_parameter_sharding, env, fused_params=None,
                 device=None, qcomm_codecs_registry=None, module_fqn=None,
                 sharded_module_order_overwrite=None):
        plan = {c.name: table_name_to_parameter_sharding[c.name]
                for c in module.embedding_bag_configs()}
        self._check_plan(module, plan)
        # What the overridden hooks below need while TorchRec's constructor runs; the
        # unsharded module itself is not kept.
        object.__setattr__(self, "_source", module)
        object.__setattr__(self, "_local_shards", {})
        super().__init__(module, table_name_to_parameter_sharding, env, fused_params, device,
                         qcomm_codecs_registry, module_fqn, sharded_module_order_overwrite)
        if not hasattr(self, "_shard_places"):  # TorchRec skips it for a "fake" backend
            self._initialize_torch_state()
        object.__delattr__(self, "_source")
        # Mean pooling of row-split tables is applied here (_finish), per output column.
        self._has_mean_pooling_callback = False
        self._output_dtype = next(iter(module.embedding_bags.values())).output_dtype
        self._mean_columns = self._row_split_mean_columns()
        configs = {c.name: c for c in module.embedding_bag_configs()}
        self._feature_rows = {name: c.num_embeddings
                              for c in configs.values() for name in c.feature_names}
        self._feature_table = {name: c.name for c in configs.values() for name in c.feature_names}

    @staticmethod
    def _check_plan(module, plan) -> None:
        for name, ps in plan.items():
            if ps.sharding_type not in SHARDING_TYPES:
                raise ValueError(f"qembed: table {name!r}: sharding type {ps.sharding_type!r} "
                                 f"is not supported; use one of {list(SHARDING_TYPES)}")
        if isinstance(module, LowPrecisionEmbeddingBagCollection):
            tables = list(module.embedding_bags.values())
            if not LowPrecisionEmbeddingBagCollection._fused(tables):
                raise ValueError(
                    "qembed: sharded training needs every table updated by the fused update "
                    "in backward with the same options (fused_update=True, one-pass ALPT, the "
                    "same optimizer, learning rates and rounding)")
        configs = {c.name: c for c in module.embedding_bag_configs()}
        for name, ps in plan.items():
            if ps.sharding_type != ShardingType.COLUMN_WISE.value:
                continue
            widths = {s.shard_sizes[1] for s in ps.sharding_spec.shards}
            if len(widths) != 1 or any(w % 8 for w in widths):
                raise ValueError(
                    f"qembed: table {name!r} (dim {configs[name].embedding_dim}): column-wise "
                    f"shards must have one width, a multiple of 8; got {sorted(widths)}")

    @classmethod
    def create_grouped_sharding_infos(cls, module, table_name_to_parameter_sharding, prefix,
                                      fused_params, suffix="weight"):
        # qembed's tables are packed rows, `qweight`, where TorchRec's have `weight`.
        return super().create_grouped_sharding_infos(
            module, table_name_to_parameter_sharding, prefix, fused_params, suffix="qweight")

    # --- building the shards and lookups ----------------------------------------------------

    def _create_lookups(self) -> None:
        source = self._source
        for sharding_type, sharding in zip(self._sharding_types, self._embedding_shardings):
            row_split = sharding_type in _ROW_SPLIT_POOLING
            tables = []
            for group in sharding._grouped_embedding_configs_per_rank[sharding._rank]:
                for t in group.embedding_tables:
                    row0, col0 = t.local_metadata.shard_offsets
                    shard = self._local_shard(source, t.name, t.local_rows, t.local_cols,
                                              row0, col0)
                    tables.append((shard, list(t.feature_names), _POOLING[t.pooling]))
            self._lookups.append(_ShardLookup(tables, row_split))

    def _local_shard(self, source, name: str, rows: int, cols: int, row0: int, col0: int):
        key = (name, row0, col0)
        if key in self._local_shards:
            return self._local_shards[key]
        table = source.embedding_bags[name]
        device = self._device or table.qweight.device
        shard = _empty_shard(table, rows, cols, row0, col0, device)
        if table.qweight.device.type == "meta":  # nothing to copy: draw it from the seed
            self._fill_from_seed(shard)
        else:
            with torch.no_grad():
                for buf, value in table.state_dict().items():
                    if buf == "nonfinite_rows" and (row0, col0) != (0, 0):
                        continue  # the table's count of skipped rows goes to one shard
                    getattr(shard, buf).copy_(_slice_full(buf, value, shard, row0, col0))
            shard._host_counters = None
        self._local_shards[key] = shard
        return shard

    @staticmethod
    def _fill_from_seed(shard: nn.Module) -> None:
        if isinstance(shard, _LowPrecisionTable):
            shard.reset_parameters()
        else:  # inference tables start from N(0, 1), as the unsharded collection's do
            weight = torch.randn(shard.num_embeddings, shard.embedding_dim,
                                 device=shard.qweight.device)
            shard.load_float_weight(weight)

    def reset_parameters(self) -> None:
        """Every local shard back to its table's initial values: drawn from the table's seed
        for training tables (the values the unsharded collection starts from, whatever the
        sharding), N(0, 1) for inference ones."""
        for table in self.embedding_bags.values():
            for shard in table.shards:
                self._fill_from_seed(shard)

    # --- state dict ---------------------------------------------------------------------------

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        self.embedding_bags = nn.ModuleDict()
        self._shard_places = {}
        for config in self._embedding_bag_configs:
            ps = self.module_sharding_plan[config.name]
            order = sorted(ps.sharding_spec.shards,
                           key=lambda s: (s.shard_offsets[0], s.shard_offsets[1]))
            self._shard_places[config.name] = [
                (list(s.shard_offsets), list(s.shard_sizes), s.placement) for s in order]
            holder = _TableShards()
            for index, s in enumerate(order):
                key = (config.name, s.shard_offsets[0], s.shard_offsets[1])
                if key in self._local_shards:
                    holder.shards.append(self._local_shards[key])
                    holder.places.append((index,) + key[1:])
            self.embedding_bags[config.name] = holder
        object.__delattr__(self, "_local_shards")
        if not skip_registering:
            self._register_state_dict_hook(ShardedQEmbeddingBagCollection._emit_state)
            self._register_load_state_dict_pre_hook(self._take_state, with_module=True)

    def _table_layout(self, name: str, local: nn.Module):
        """(column-split, number of shards, per-table values kept per shard) of table
        `name`, of which `local` is a shard."""
        places = self._shard_places[name]
        column_split = self.module_sharding_plan[name].sharding_type == \
            ShardingType.COLUMN_WISE.value
        learned = isinstance(local, _LowPrecisionTable) and local.learn_step
        return column_split, len(places), learned and len(places) > 1

    def _global_pieces(self, name: str, buf: str, local: nn.Module):
        """How buffer `buf` of table `name` (of which `local` is a shard) is laid out over
        its shards: (global size, [(offsets, sizes, placement)] by shard index), or None for
        a value every shard holds whole."""
        column_split, n, per_shard = self._table_layout(name, local)
        places = self._shard_places[name]
        width = getattr(local, buf).shape[1:]
        if buf in _per_row_buffers(local):
            if column_split:  # shard j at rows [j R, (j + 1) R)
                rows = places[0][1][0]
                return ([n * rows, *width],
                        [([j * rows] + [0] * len(width), [rows, *width], p)
                         for j, (_, _, p) in enumerate(places)])
            config = next(c for c in self._embedding_bag_configs if c.name == name)
            return ([config.num_embeddings, *width],
                    [([o[0]] + [0] * len(width), [s[0], *width], p) for o, s, p in places])
        if buf in ("step", "step_state") and per_shard:  # one per shard, stacked
            size = list(getattr(local, buf).shape)
            return ([n * size[0], *size[1:]],
                    [([j * size[0]] + [0] * (len(size) - 1), size, p)
                     for j, (_, _, p) in enumerate(places)])
        return None

    @staticmethod
    def _emit_state(module, state_dict, prefix, local_metadata) -> None:
        """state_dict hook: each table's local shards' buffers -> the unsharded collection's
        keys (see the module's documentation)."""
        pg = module._env.process_group
        for name, table in module.embedding_bags.items():
            base = f"{prefix}embedding_bags.{name}."
            for key in [k for k in state_dict if k.startswith(base + "shards.")]:
                del state_dict[key]
            if not len(table.shards):
                continue
            first = table.shards[0]
            for buf, value in first.state_dict(keep_vars=True).items():
                layout = module._global_pieces(name, buf, first)
                if buf == "nonfinite_rows":
                    value = sum(m.nonfinite_rows for m in table.shards)
                if layout is None:
                    state_dict[base + buf] = value.detach()
                    continue
                size, pieces = layout
                if 0 in size:  # an empty buffer (no optimizer state): its shape is enough
                    state_dict[base + buf] = value.new_zeros(size)
                    continue
                local = {index: getattr(m, buf).detach()
                         for m, (index, _, _) in zip(table.shards, table.places)}
                state_dict[base + buf] = _sharded_tensor(pieces, local, size, value.dtype, pg)

    def _take_state(self, module, state_dict, prefix, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
        """load_state_dict pre-hook: the unsharded collection's keys (ShardedTensors laid out
        as _emit_state lays them, or the unsharded collection's plain tensors) -> each local
        shard's buffers."""
        for name, table in self.embedding_bags.items():
            base = f"{prefix}embedding_bags.{name}."
            if not len(table.shards):
                for key in [k for k in state_dict if k.startswith(base)]:
                    del state_dict[key]
                continue
            for buf in table.shards[0].state_dict():
                if base + buf not in state_dict:
                    continue
                value = state_dict.pop(base + buf)
                for i, (m, (index, row0, col0)) in enumerate(zip(table.shards, table.places)):
                    state_dict[f"{base}shards.{i}.{buf}"] = self._local_value(
                        name, buf, value, m, index, row0, col0)

    def _local_value(self, name, buf, value, shard, index, row0, col0) -> torch.Tensor:
        """Shard `shard`'s part of the state's `value` for its buffer `buf`."""
        layout = self._global_pieces(name, buf, shard)
        if isinstance(value, ShardedTensor):
            if layout is None:
                raise ValueError(f"qembed: table {name!r}: {buf} is one value for the table, "
                                 "got a ShardedTensor")
            offsets = layout[1][index][0]
            for piece in value.local_shards():
                if list(piece.metadata.shard_offsets) == offsets:
                    return piece.tensor
            raise ValueError(
                f"qembed: table {name!r}: the state's {buf} is sharded differently from this "
                "model (another world size or split); load it with torch.distributed."
                "checkpoint, which reshards, or pass the unsharded collection's tensors")
        if layout is None:
            if buf == "nonfinite_rows" and (row0, col0) != (0, 0):
                return torch.zeros_like(value)
            return value
        if 0 in value.shape:  # an empty buffer: the shard's own shape
            return getattr(shard, buf)
        column_split, _, per_shard = self._table_layout(name, shard)
        if tuple(value.shape) == tuple(layout[0]) and (column_split or per_shard):
            offsets, sizes, _ = layout[1][index]  # this model's own stacked layout
            return value[offsets[0]: offsets[0] + sizes[0]]
        return _slice_full(buf, value, shard, row0, col0)

    def sharded_parameter_names(self, prefix: str = ""):
        # The shards' buffers differ from rank to rank: DDP must neither broadcast nor check
        # them.
        for name, _ in self.embedding_bags.named_buffers(prefix=f"{prefix}.embedding_bags"
                                                         if prefix else "embedding_bags"):
            yield name

    # --- forward ------------------------------------------------------------------------------

    def _row_split_mean_columns(self) -> list[tuple[str, int, int]]:
        """(feature, first column, last column + 1) of the output columns that row-split
        tables pool by mean, in the output's order."""
        mean_tables = {c.name for c in self._embedding_bag_configs
                       if c.pooling == PoolingType.MEAN and
                       self.module_sharding_plan[c.name].sharding_type in _ROW_SPLIT_POOLING}
        keys = {}
        for c in self._embedding_bag_configs:
            if c.name in mean_tables:
                for feature, key in zip(c.feature_names, _output_keys(self._embedding_bag_configs,
                                                                      c)):
                    keys[key] = feature
        columns, start = [], 0
        for key, dim in zip(self._embedding_names, self._embedding_dims):
            if key in keys:
                columns.append((keys[key], start, start + dim))
            start += dim
        return columns

    def _check_ids(self, features: KeyedJaggedTensor) -> None:
        """An id outside its table raises here, before TorchRec sends it anywhere."""
        keys = features.keys()
        unknown = [k for k in keys if k not in self._feature_rows]
        if unknown:
            raise ValueError(f"qembed: the KeyedJaggedTensor has keys {unknown} that are not "
                             f"the collection's features {sorted(self._feature_rows)}")
        values = features.values()
        if values.numel() == 0:
            return
        per_key = features.length_per_key()
        bound = torch.repeat_interleave(
            torch.tensor([self._feature_rows[k] for k in keys], device=values.device),
            torch.tensor(per_key, device=values.device))
        bad = (values < 0) | (values >= bound)
        if not bool(bad.any()):
            return
        position = int(bad.nonzero()[0])
        ends = torch.tensor(per_key).cumsum(0)
        key = keys[int((ends <= position).sum())]
        rank = dist.get_rank(self._env.process_group)
        raise IndexError(
            f"qembed: feature {key!r} (table {self._feature_table[key]!r}) has id "
            f"{int(values[position])}, outside its table of {self._feature_rows[key]} rows, "
            f"on rank {rank}; the other ranks stop when the process group's timeout "
            f"({_pg_timeout(self._env.process_group, values.device)}) expires")

    def input_dist(self, ctx: EmbeddingBagCollectionContext, features):
        if isinstance(features, KeyedJaggedTensor):
            if features.variable_stride_per_key():
                raise ValueError("qembed: batches with a different batch size per feature "
                                 "(variable stride) are not supported")
            self._check_ids(features)
            ctx.qembed_mean_factor = self._mean_factor(features)
        return super().input_dist(ctx, features)

    def _mean_factor(self, features: KeyedJaggedTensor) -> torch.Tensor | None:
        """[B, output width] fp32: 1 / bag length on the columns of row-split mean tables
        (1 for empty bags), 1 elsewhere; None when there are no such columns."""
        if not self._mean_columns:
            return None
        if features.weights_or_none() is not None:
            raise ValueError("qembed: tables pooled by mean take no per-sample weights")
        batch = features.stride()
        lengths = features.lengths().view(len(features.keys()), batch)
        factor = torch.ones(batch, sum(self._embedding_dims), device=lengths.device)
        keys = features.keys()
        for feature, start, end in self._mean_columns:
            length = lengths[keys.index(feature)].clamp(min=1).to(torch.float32)
            factor[:, start:end] = (1.0 / length)[:, None]
        return factor

    def _finish(self, keyed: KeyedTensor, factor: torch.Tensor | None) -> KeyedTensor:
        values = keyed.values()
        if factor is not None:
            values = values * factor
        values = values.to(self._output_dtype)
        return KeyedTensor(keys=keyed.keys(), length_per_key=keyed.length_per_key(),
                           values=values, key_dim=1)

    def output_dist(self, ctx, output):
        awaitable = super().output_dist(ctx, output)
        awaitable.callbacks.append(partial(self._finish,
                                           factor=getattr(ctx, "qembed_mean_factor", None)))
        return awaitable

    def compute_and_output_dist(self, ctx, input):
        awaitable = super().compute_and_output_dist(ctx, input)
        awaitable.callbacks.append(partial(self._finish,
                                           factor=getattr(ctx, "qembed_mean_factor", None)))
        return awaitable

    def update_shards(self, changed_sharding_params, env, device) -> None:
        raise NotImplementedError("qembed: resharding a qembed collection in place is not "
                                  "supported; save it and load it into the new plan")

    @property
    def nbytes(self) -> int:
        """Bytes held by this rank's shards (packed rows, steps, optimizer state)."""
        return sum(m.nbytes for t in self.embedding_bags.values() for m in t.shards)


def _output_keys(configs, config) -> list[str]:
    """The config's features' output keys (``feature@table`` for a feature several tables
    read), as TorchRec names them."""
    count: dict[str, int] = defaultdict(int)
    for c in configs:
        for name in c.feature_names:
            count[name] += 1
    return [n if count[n] == 1 else f"{n}@{config.name}" for n in config.feature_names]


# --- the sharder ------------------------------------------------------------------------------

class QEmbedSharder(EmbeddingBagCollectionSharder):
    """TorchRec sharder of a qembed collection: ``module_type`` is
    :class:`~qembed.torchrec.LowPrecisionEmbeddingBagCollection` (the default) or
    :class:`~qembed.torchrec.QuantizedEmbeddingBagCollection`; pass one sharder per kind a
    model holds (DMP picks a sharder by the module's exact type).

    Offers table-wise, row-wise, column-wise and table-row-wise sharding on CPU and CUDA
    (TorchRec's stock sharders offer row-wise only on CUDA) with the ``fused`` compute kernel
    (the update runs in backward; any kernel a hand-made plan names is served by qembed's).
    The planner sizes a table as ``R x D`` one-byte values: packed rows of ``bits`` bits plus
    their steps and the optimizer state are not what it counts, so give it a memory margin.
    """

    def __init__(self, module_type: type = LowPrecisionEmbeddingBagCollection,
                 fused_params=None, qcomm_codecs_registry=None):
        if module_type not in (LowPrecisionEmbeddingBagCollection,
                               QuantizedEmbeddingBagCollection):
            raise TypeError(f"qembed: QEmbedSharder shards qembed's collections, not "
                            f"{getattr(module_type, '__name__', module_type)}")
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._module_type = module_type

    def shard(self, module, params, env, device=None, module_fqn=None):
        return ShardedQEmbeddingBagCollection(
            module, params, env, self.fused_params, device,
            qcomm_codecs_registry=self.qcomm_codecs_registry, module_fqn=module_fqn)

    def shardable_parameters(self, module) -> dict[str, torch.Tensor]:
        # The planner and the plan helpers read a table's logical [R, D] shape; the plan
        # helpers give training tables, whose optimizer runs in backward, the fused kernel.
        params = {}
        for c in module.embedding_bag_configs():
            params[c.name] = torch.empty(c.num_embeddings, c.embedding_dim, dtype=torch.uint8,
                                         device="meta")
            if isinstance(module, LowPrecisionEmbeddingBagCollection):
                params[c.name]._in_backward_optimizers = []
        return params

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return [EmbeddingComputeKernel.FUSED.value]

    @property
    def module_type(self) -> type:
        return self._module_type

    @property
    def sharded_module_type(self) -> type:
        return ShardedQEmbeddingBagCollection
