"""Collections of packed tables with the interface of ``torchrec.EmbeddingBagCollection``.

Each collection holds one qembed module per table in ``embedding_bags`` (a ``ModuleDict``
keyed by table name, as TorchRec's holds ``nn.EmbeddingBag``s), so its ``state_dict`` is the
per-table modules' and any table can be taken out as a module of its own. ``forward`` looks
up every feature of the batch in one call of :func:`qembed.ops.embedding_bags`, which writes
each feature's pooled rows straight into its columns of the ``KeyedTensor``.

Keys, order and semantics follow TorchRec: a table with no ``feature_names`` is read by the
feature of its own name; several features may share a table; a feature read by several
tables is named ``feature@table`` in the output; the output keys go table by table, each
table's features in its config's order, whatever the order of the batch's keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .. import ops
from ..nn._common import TrainableLookup
from ..nn.lowp import LowPrecisionEmbeddingBag, _LowPrecisionTable
from ..nn.quantized import QuantizedEmbeddingBag
from .interchange import from_quant_ebc, to_quant_ebc

_POOLING = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


def _per_table(value, configs: list[EmbeddingBagConfig], what: str) -> list:
    """One value per table: `value` for all of them, or a dict by table name."""
    if not isinstance(value, dict):
        return [value] * len(configs)
    names = [c.name for c in configs]
    unknown, missing = sorted(set(value) - set(names)), [n for n in names if n not in value]
    if unknown or missing:
        raise ValueError(f"qembed: {what} per table must name each table once; unknown "
                         f"tables {unknown}, tables without a value {missing}")
    return [value[n] for n in names]


def _embedding_names(configs: list[EmbeddingBagConfig]) -> list[list[str]]:
    """Each table's output keys: its features' names, ``feature@table`` for a feature that
    several tables read (TorchRec's naming)."""
    count: dict[str, int] = {}
    for c in configs:
        for name in c.feature_names:
            count[name] = count.get(name, 0) + 1
    return [[name if count[name] == 1 else f"{name}@{c.name}" for name in c.feature_names]
            for c in configs]


@dataclass
class _Plan:
    """How a batch with given keys maps onto the op: per op feature (a key of the batch, in
    its order, or of the batch permuted by `permute`), its table, columns and pooling."""

    feature_tables: list[int]
    feature_columns: list[int]
    poolings: list[str]
    feature_names: list[str]
    permute: list[int] | None


class _Collection(nn.Module):
    """What both collections share: the configs, the output layout, the lookup."""

    def _setup(self, tables: list[EmbeddingBagConfig], is_weighted: bool,
               modules: dict[str, nn.Module]) -> None:
        self._embedding_bag_configs = tables
        self._is_weighted = is_weighted
        self.embedding_bags = nn.ModuleDict(modules)
        names = _embedding_names(tables)
        self._embedding_names = [n for table in names for n in table]
        self._lengths_per_embedding = [c.embedding_dim for c in tables for _ in c.feature_names]
        self._feature_names = [list(c.feature_names) for c in tables]
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._args_cache = None  # (identity of the modules' tensors, the op's table lists)

    @staticmethod
    def _check_configs(tables: list[EmbeddingBagConfig]) -> None:
        if not tables:
            raise ValueError("qembed: a collection needs at least one table")
        seen = set()
        for c in tables:
            if c.name in seen:
                raise ValueError(f"qembed: duplicate table name {c.name!r}")
            seen.add(c.name)
            if c.pooling not in _POOLING:
                raise ValueError(f"qembed: table {c.name!r}: pooling {c.pooling} is not "
                                 "supported (SUM or MEAN)")
            if not c.feature_names:
                c.feature_names = [c.name]

    # --- TorchRec's interface ------------------------------------------------------------

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        """The tables' device (TorchRec's collections have this too)."""
        return next(iter(self.embedding_bags.values())).qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes held by all tables (see :attr:`nbytes_per_table`)."""
        return sum(self.nbytes_per_table.values())

    @property
    def nbytes_per_table(self) -> dict[str, int]:
        """Bytes held by each table, by name: its packed rows (``R * row_bytes``) plus, for
        training, its steps and optimizer state."""
        return {name: m.nbytes for name, m in self.embedding_bags.items()}

    def to_torchrec(self, output_dtype: torch.dtype | None = None,
                    row_alignment: int = 16) -> QuantEmbeddingBagCollection:
        """TorchRec's ``QuantEmbeddingBagCollection`` serving this collection's tables, e.g.
        tables trained in low precision (:func:`qembed.torchrec.interchange.to_quant_ebc`):
        exact but for the fp16 rounding of scale and bias; widths FBGEMM lacks are stored
        at the next one it has."""
        return to_quant_ebc(self._embedding_bag_configs, dict(self.embedding_bags),
                            is_weighted=self._is_weighted,
                            output_dtype=output_dtype or self._output_dtype(),
                            row_alignment=row_alignment)

    @classmethod
    def _from_tables(cls, tables: list[EmbeddingBagConfig], is_weighted: bool,
                     modules: dict[str, nn.Module]):
        """A collection over existing per-table modules (no tables initialised)."""
        collection = cls.__new__(cls)
        nn.Module.__init__(collection)
        collection._check_configs(tables)
        collection._setup(tables, is_weighted, modules)
        return collection

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        plan = self._plan(features)
        if plan.permute is not None:  # checked first: the permuted batch would hide it
            self._check_lengths(features.offsets(), features.values())
            features = features.permute(plan.permute)
        weights = features.weights_or_none() if self._is_weighted else None
        if self._is_weighted and weights is None:
            raise ValueError("qembed: the collection is weighted (is_weighted=True) but the "
                             "KeyedJaggedTensor has no weights")
        values, offsets = features.values(), features.offsets()
        try:
            out = self._lookup_batch(values, offsets, weights, plan)
        except (IndexError, ValueError, TypeError):
            self._diagnose(plan, values, offsets, weights)
            raise
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_embedding,
                           values=out, key_dim=1)

    # --- the op's arguments ---------------------------------------------------------------

    def _plan(self, features: KeyedJaggedTensor) -> _Plan:
        if features.variable_stride_per_key():
            raise ValueError("qembed: batches with a different batch size per feature "
                             "(variable stride) are not supported")
        keys = tuple(features.keys())
        plan = self._plans.get(keys)
        if plan is None:
            plan = self._plans[keys] = self._make_plan(list(keys))
        return plan

    def _make_plan(self, keys: list[str]) -> _Plan:
        expected = {name for names in self._feature_names for name in names}
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        unknown = [k for k in keys if k not in expected]
        missing = sorted(expected - set(keys))
        if duplicates or unknown or missing:
            raise ValueError(
                "qembed: the KeyedJaggedTensor's keys must be the collection's features "
                f"{sorted(expected)} (in any order); got {keys}: unknown {unknown}, "
                f"missing {missing}, repeated {duplicates}")
        # (key, table, first column) of each output block, in KeyedTensor order
        blocks, column = [], 0
        for t, (c, names) in enumerate(zip(self._embedding_bag_configs, self._feature_names)):
            for name in names:
                blocks.append((name, t, column))
                column += c.embedding_dim
        tables_of = {k: [b for b in blocks if b[0] == k] for k in keys}
        position = {k: i for i, k in enumerate(keys)}
        if all(len(v) == 1 for v in tables_of.values()):  # each key read by one table
            order, permute = [tables_of[k][0] for k in keys], None
        else:  # a key read by several tables: repeat its values, once per table
            order, permute = blocks, [position[b[0]] for b in blocks]
        pooling = [_POOLING[c.pooling] for c in self._embedding_bag_configs]
        return _Plan([b[1] for b in order], [b[2] for b in order],
                     [pooling[b[1]] for b in order],
                     [f"{b[0]!r} (table {self._embedding_bag_configs[b[1]].name!r})"
                      for b in order], permute)

    def _table_args(self):
        """The op's per-table lists (:func:`table_args`), kept while the modules hold the
        same tensors (.to() and assignment replace them, load_state_dict copies into them): a
        batch costs no new tensors."""
        modules = list(self.embedding_bags.values())
        key = tuple(id(t) for m in modules for t in (m.qweight, m.step))
        if self._args_cache is None or self._args_cache[0] != key:
            self._args_cache = (key, table_args(modules))
        return self._args_cache[1]

    def _output_dtype(self) -> torch.dtype:
        return next(iter(self.embedding_bags.values())).output_dtype

    def _lookup_batch(self, values, offsets, weights, plan: _Plan) -> torch.Tensor:
        return self._lookup(values, offsets, weights, plan)

    def _lookup(self, values, offsets, weights, plan: _Plan) -> torch.Tensor:
        args = self._table_args()
        for name, table in zip(self.embedding_bags, args[0]):
            if table.device != values.device:
                raise ValueError(f"qembed: table {name!r} is on {table.device} but the batch "
                                 f"is on {values.device}")
        return ops.embedding_bags(*args, plan.feature_tables, plan.feature_columns,
                                  plan.poolings, values, offsets, weights, self._output_dtype())

    @staticmethod
    def _check_lengths(offsets, values) -> None:
        if int(offsets[-1]) != values.numel():
            raise ValueError(f"qembed: the batch's lengths add up to {int(offsets[-1])} but it "
                             f"has {values.numel()} values")

    def _diagnose(self, plan: _Plan, values, offsets, weights) -> None:
        """After the op refused a batch: raises the error that names the feature and table,
        where the op's message could only number them."""
        modules = list(self.embedding_bags.values())
        num = len(plan.feature_tables)
        if offsets.numel() < 1 or (offsets.numel() - 1) % num:
            return
        batch = (offsets.numel() - 1) // num
        off = offsets.long().cpu()
        self._check_lengths(off, values)
        if weights is not None and weights.numel() != values.numel():
            raise ValueError(f"qembed: the batch has {weights.numel()} weights for "
                             f"{values.numel()} values")
        for f, (t, feature) in enumerate(zip(plan.feature_tables, plan.feature_names)):
            part = off[f * batch: (f + 1) * batch + 1]
            if bool((part[1:] < part[:-1]).any()):
                raise ValueError(f"qembed: feature {feature} has a negative length")
            if weights is not None and plan.poolings[f] == "mean":
                raise ValueError(f"qembed: feature {feature} pools by mean, which takes no "
                                 "per-sample weights")
            ids = values[int(part[0]): int(part[-1])]
            rows = modules[t].num_embeddings
            bad = ids[(ids < 0) | (ids >= rows)]
            if bad.numel():
                raise IndexError(f"qembed: feature {feature} has id {int(bad[0])}, outside its "
                                 f"table of {rows} rows")


def _configs_of(ebc: EmbeddingBagCollection) -> list[EmbeddingBagConfig]:
    if type(ebc) is not EmbeddingBagCollection:
        raise TypeError(f"qembed: from_torchrec takes a torchrec EmbeddingBagCollection, got "
                        f"{type(ebc).__name__}")
    return ebc.embedding_bag_configs()


class QuantizedEmbeddingBagCollection(_Collection):
    """``torchrec.EmbeddingBagCollection`` over packed int-``bits`` tables, for inference.

    ``bits`` (1..8) and ``format`` (``"affine"``, ``"symmetric"``, ``"symmetric_table"``)
    apply to every table, or per table as a dict by table name. ``output_dtype`` is the
    ``KeyedTensor``'s dtype (TorchRec's collection returns float32). Tables start from
    N(0, 1) values; :meth:`from_torchrec` quantizes a trained collection.
    """

    def __init__(self, tables: list[EmbeddingBagConfig], is_weighted: bool = False,
                 device: torch.device | str | None = None, *, bits: int | dict = 8,
                 format: str | dict = "affine", output_dtype: torch.dtype = torch.float32,
                 _weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self._check_configs(tables)
        bits_t, format_t = _per_table(bits, tables, "bits"), _per_table(format, tables, "format")
        weights = _weights or {}
        modules = {c.name: QuantizedEmbeddingBag(
            c.num_embeddings, c.embedding_dim, mode=_POOLING[c.pooling], _weight=weights.get(c.name),
            include_last_offset=True, device=device, dtype=output_dtype, bits=b, format=f)
            for c, b, f in zip(tables, bits_t, format_t)}
        self._setup(tables, is_weighted, modules)

    @classmethod
    def from_torchrec(cls, ebc: EmbeddingBagCollection, bits: int | dict = 8,
                      format: str | dict = "affine",
                      output_dtype: torch.dtype = torch.float32
                      ) -> "QuantizedEmbeddingBagCollection":
        """Quantizes each table of TorchRec's collection (round to nearest), on its device."""
        configs = _configs_of(ebc)
        weights = {c.name: ebc.embedding_bags[c.name].weight for c in configs}
        device = next(iter(weights.values())).device
        return cls(configs, ebc.is_weighted(), device, bits=bits, format=format,
                   output_dtype=output_dtype, _weights=weights)

    @classmethod
    def from_quant_ebc(cls, qebc: QuantEmbeddingBagCollection, bits: int | dict | None = None,
                       format: str | dict = "affine") -> "QuantizedEmbeddingBagCollection":
        """The tables of TorchRec's ``QuantEmbeddingBagCollection`` (INT8/4/2), exactly
        (:func:`qembed.torchrec.interchange.from_quant_ebc`); ``bits`` may be narrower than
        FBGEMM's width where the codes fit."""
        modules = from_quant_ebc(qebc, bits=bits, format=format)
        return cls._from_tables(list(qebc.embedding_bag_configs()), qebc.is_weighted(), modules)

    def extra_repr(self) -> str:
        return f"tables={len(self.embedding_bags)}, is_weighted={self._is_weighted}"


# The options of LowPrecisionEmbeddingBag that the fused update of all tables takes once.
_UPDATE_OPTIONS = ("optimizer", "lr", "eps", "weight_decay", "betas", "learn_step",
                   "step_optimizer", "step_lr", "rounding")


class LowPrecisionEmbeddingBagCollection(_Collection):
    """``torchrec.EmbeddingBagCollection`` trained directly in low precision: one
    :class:`qembed.LowPrecisionEmbeddingBag` per table (``bits`` per table or for all, the
    other options of ``LowPrecisionEmbeddingBag`` for all), updated inside backward.

    One call computes every table's row gradients and updates every table
    (:func:`qembed.ops.embedding_bags_backward_update`, each row's gradient applied as soon
    as it is summed); tables with ``fused_update=False`` or two-pass ALPT go through their
    module's own path. Table ``t`` (in config order) draws
    its initial values and stochastic rounding from ``seed + t`` (or ``seed[name]`` from a
    dict), so a collection equals per-table modules built with those seeds, bit for bit.
    """

    def __init__(self, tables: list[EmbeddingBagConfig], is_weighted: bool = False,
                 device: torch.device | str | None = None, *, bits: int | dict = 8,
                 seed: int | dict = 0, output_dtype: torch.dtype = torch.float32,
                 _weights: dict[str, torch.Tensor] | None = None, **train):
        super().__init__()
        self._check_configs(tables)
        bits_t = _per_table(bits, tables, "bits")
        seeds = (_per_table(seed, tables, "seed") if isinstance(seed, dict)
                 else [seed + t for t in range(len(tables))])
        weights = _weights or {}
        modules = {c.name: LowPrecisionEmbeddingBag(
            c.num_embeddings, c.embedding_dim, mode=_POOLING[c.pooling],
            _weight=weights.get(c.name), include_last_offset=True, device=device,
            dtype=output_dtype, bits=b, seed=s, **train)
            for c, b, s in zip(tables, bits_t, seeds)}
        self._setup(tables, is_weighted, modules)

    @classmethod
    def from_torchrec(cls, ebc: EmbeddingBagCollection, bits: int | dict = 8,
                      seed: int | dict = 0, output_dtype: torch.dtype = torch.float32,
                      **train) -> "LowPrecisionEmbeddingBagCollection":
        """Starts training from TorchRec's collection's fp32 tables (steps from their
        values), on its device."""
        configs = _configs_of(ebc)
        weights = {c.name: ebc.embedding_bags[c.name].weight for c in configs}
        device = next(iter(weights.values())).device
        return cls(configs, ebc.is_weighted(), device, bits=bits, seed=seed,
                   output_dtype=output_dtype, _weights=weights, **train)

    def _lookup_batch(self, values, offsets, weights, plan: _Plan) -> torch.Tensor:
        """The lookup whose backward updates every table (as each LowPrecisionEmbeddingBag's
        lookup does)."""
        modules = list(self.embedding_bags.values())
        for m in modules:
            if not m._step_pass:
                m._finish_pending()
        if not torch.is_grad_enabled():
            return self._lookup(values, offsets, weights, plan)
        anchor = torch.empty(0, device=values.device, requires_grad=True)
        stepping = [m for m in modules if m._step_pass]
        if stepping:  # two-pass ALPT's second pass backpropagates into the anchors
            stepping[0]._anchors.append(anchor)
        return TrainableLookup.apply(anchor, weights, self, values, offsets, plan)

    def _psw_backward(self, grad_out, values, offsets, plan: _Plan) -> torch.Tensor:
        tables, steps, bits, dims, formats = self._table_args()
        return ops.embedding_bags_psw_backward(grad_out, tables, steps, bits, dims, formats,
                                               plan.feature_tables, plan.feature_columns,
                                               values, offsets)

    def _backward(self, grad_out, values, offsets, weights, plan: _Plan) -> None:
        modules = list(self.embedding_bags.values())
        dims = [m.embedding_dim for m in modules]
        weights = None if weights is None else weights.detach()
        stepping = any(m._step_pass for m in modules)
        if not stepping and self._fused(modules):
            backward_update_tables(modules, self._table_args(), grad_out, plan.feature_tables,
                                   plan.feature_columns, plan.poolings, values, offsets,
                                   weights)
            return
        rows, grads = ops.embedding_bags_backward(
            grad_out, dims, plan.feature_tables, plan.feature_columns, plan.poolings, values,
            offsets, weights)
        for m, r, g in zip(modules, rows, grads):
            if m._step_pass or not stepping:  # only the tables two-pass ALPT is stepping
                m._apply_row_grads(r, g)

    @staticmethod
    def _fused(modules: list[LowPrecisionEmbeddingBag]) -> bool:
        """Whether one fused update serves every table: all update in backward, in one pass,
        with the same options."""
        first = tuple(getattr(modules[0], o) for o in _UPDATE_OPTIONS)
        return all(m.fused_update and not (m.learn_step and m.step_grad == "two_pass") and
                   tuple(getattr(m, o) for o in _UPDATE_OPTIONS) == first for m in modules)

    def extra_repr(self) -> str:
        return f"tables={len(self.embedding_bags)}, is_weighted={self._is_weighted}"


def table_args(modules: list[nn.Module]):
    """The embedding_bags ops' per-table lists for these table modules: tables, steps
    (empty where the format has none), bits, dims, formats."""
    tables = [m.qweight for m in modules]
    steps = [m.step if m.step is not None else m.qweight.new_empty(0, dtype=torch.float32)
             for m in modules]
    return (tables, steps, [m.bits for m in modules], [m.embedding_dim for m in modules],
            [m.format for m in modules])


def _update_options(modules: list[_LowPrecisionTable]) -> dict:
    """The many-table update's options for these tables (which share them), their counters
    advanced: a table that is a shard keys its rounding by its place in the whole table."""
    for m in modules:
        m._finish_pending()
    m0 = modules[0]
    return dict(optimizer=m0.optimizer, lr=m0.lr, eps=m0.eps, weight_decay=m0.weight_decay,
                betas=m0.betas, learn_step=m0.learn_step, step_optimizer=m0.step_optimizer,
                step_lr=m0.step_lr, stochastic=m0.rounding == "stochastic",
                seeds=[m._counters()[0] for m in modules],
                counters=[m._next_update() for m in modules],
                row_offsets=[m.row_offset for m in modules],
                column_offsets=[m.column_offset for m in modules])


def _count_skipped(modules: list[_LowPrecisionTable], skipped: torch.Tensor) -> None:
    """Each table's count of rows skipped for a non-finite gradient."""
    if skipped.device.type == "cpu" and not bool(skipped.any()):
        return  # the usual case, without a counter update per table
    for m, s in zip(modules, skipped.to(modules[0].qweight.device)):
        m._count_skipped(s)


@torch.no_grad()
def backward_update_tables(modules: list[_LowPrecisionTable], args, grad_out, feature_tables,
                           feature_columns, poolings, values, offsets, weights) -> None:
    """The backward of a lookup of these tables (`args`: their :func:`table_args`) and their
    update, in one call that never stores the row gradients (they share their update
    options)."""
    options = _update_options(modules)
    tables, steps, bits, dims, formats = args
    skipped = ops.embedding_bags_backward_update(
        grad_out, feature_tables, feature_columns, poolings, values, offsets, weights, tables,
        steps, [m.state for m in modules], [m.step_state for m in modules], bits, dims,
        formats, **options)
    _count_skipped(modules, skipped)
