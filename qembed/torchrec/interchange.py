"""qembed tables served by TorchRec's inference stack, and back.

:func:`to_quant_ebc` builds a TorchRec ``QuantEmbeddingBagCollection``
(``torchrec.quant.embedding_modules.EmbeddingBagCollection``) that serves given qembed tables,
e.g. tables trained in low precision by :class:`~qembed.LowPrecisionEmbeddingBag`;
:func:`from_quant_ebc` turns the INT8/INT4/INT2 tables of such a collection into qembed tables.
Both convert rows as :mod:`qembed.fbgemm` does (TorchRec's collection runs FBGEMM's TBE): exact
but for the fp16 rounding of scale and bias on the way to TorchRec, with qembed's 1-, 3-, 5-,
6- and 7-bit tables stored at the next width FBGEMM has.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch
from torch import nn
from torchrec import DataType, EmbeddingBagConfig, PoolingType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from .. import fbgemm
from ..nn.quantized import QuantizedEmbeddingBag

_DATA_TYPES = {8: DataType.INT8, 4: DataType.INT4, 2: DataType.INT2}
_MODES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


def _in_config_order(configs: Sequence[EmbeddingBagConfig],
                     tables: Mapping[str, nn.Module] | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(tables, Mapping):
        missing = [c.name for c in configs if c.name not in tables]
        extra = sorted(set(tables) - {c.name for c in configs})
        if missing or extra:
            raise ValueError(f"qembed.torchrec: tables missing for {missing} or without a config "
                             f"{extra}")
        return [tables[c.name] for c in configs]
    tables = list(tables)
    if len(tables) != len(configs):
        raise ValueError(f"qembed.torchrec: {len(tables)} tables for {len(configs)} configs")
    return tables


def to_quant_ebc(configs: Sequence[EmbeddingBagConfig],
                 tables: Mapping[str, nn.Module] | Sequence[nn.Module], *,
                 is_weighted: bool = False, output_dtype: torch.dtype = torch.float32,
                 row_alignment: int = 16) -> QuantEmbeddingBagCollection:
    """A TorchRec ``QuantEmbeddingBagCollection`` whose tables hold the values of qembed
    ``tables`` (by config name, or in the order of ``configs``), on their device.

    Each config must match its table (rows, dimension, and pooling: the table's ``mode``);
    its ``data_type`` becomes the FBGEMM width that stores the table's bits (the configs are
    copied, not changed). ``is_weighted`` and ``output_dtype`` are TorchRec's arguments.
    """
    configs = list(configs)
    tables = _in_config_order(configs, tables)
    quantized_weights, typed_configs = {}, []
    for config, table in zip(configs, tables):
        where = f"table {config.name!r}"
        shape = (getattr(table, "num_embeddings", None), getattr(table, "embedding_dim", None))
        if shape != (config.num_embeddings, config.embedding_dim):
            raise ValueError(f"qembed.torchrec: {where} is configured {config.num_embeddings} x "
                             f"{config.embedding_dim}; its qembed table is {shape[0]} x {shape[1]}")
        mode = getattr(table, "mode", None)
        if _MODES.get(config.pooling) != mode:
            raise ValueError(f"qembed.torchrec: {where} pools by {config.pooling.name}; its "
                             f"qembed table's mode is {mode!r}")
        try:
            quantized_weights[config.name] = fbgemm.to_fbgemm(table)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from e
        typed_configs.append(dataclasses.replace(
            config, data_type=_DATA_TYPES[fbgemm.storage_bits(table.bits)]))
    devices = {t.qweight.device for t in tables}
    if len(devices) > 1:
        raise ValueError(f"qembed.torchrec: the tables are on different devices "
                         f"{sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    return QuantEmbeddingBagCollection(
        typed_configs, is_weighted=is_weighted, device=device, output_dtype=output_dtype,
        table_name_to_quantized_weights=quantized_weights, row_alignment=row_alignment)


def from_quant_ebc(qebc: QuantEmbeddingBagCollection, *,
                   bits: int | Mapping[str, int] | None = None,
                   format: str | Mapping[str, str] = "affine",
                   cls: type = QuantizedEmbeddingBag, **kwargs) -> dict[str, nn.Module]:
    """The tables of a TorchRec ``QuantEmbeddingBagCollection`` as qembed tables, exactly
    (see :func:`qembed.fbgemm.from_fbgemm`): ``{config name: table}`` in the collection's
    config order, each with its config's pooling as ``mode``. ``bits`` and ``format`` apply
    to every table or by name; other arguments go to ``cls``."""
    if not isinstance(qebc, QuantEmbeddingBagCollection):
        raise TypeError(f"qembed.torchrec: expected TorchRec's QuantEmbeddingBagCollection, got "
                        f"{type(qebc).__name__}")
    out = {}
    # The collection keeps one TBE per (pooling, virtual table) group of its configs.
    for group_configs, tbe in zip(qebc._key_to_tables.values(), qebc._emb_modules):
        names = [c.name for c in group_configs]
        group_bits = [bits.get(n) for n in names] if isinstance(bits, Mapping) else bits
        group_formats = ([format.get(n, "affine") for n in names]
                         if isinstance(format, Mapping) else format)
        out.update(zip(names, fbgemm.from_tbe(tbe, bits=group_bits, format=group_formats,
                                              cls=cls, **kwargs)))
    missing = [c.name for c in qebc.embedding_bag_configs() if c.name not in out]
    if missing:
        raise ValueError(f"qembed.torchrec: no TBE holds the tables {missing}")
    return {c.name: out[c.name] for c in qebc.embedding_bag_configs()}
