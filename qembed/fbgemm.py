"""Interchange with FBGEMM's inference tables: the rows of fbgemm_gpu's
``IntNBitTableBatchedEmbeddingBagsCodegen`` (the table-batched embedding, TBE, that TorchRec's
``QuantEmbeddingBagCollection`` runs).

FBGEMM's row (``SparseType`` INT8, INT4, INT2; tests check it against fbgemm_gpu 1.8.0's CPU
kernels and row quantizer)::

    [scale: fp16][bias: fp16][codes: dim * B / 8 bytes][zeros to a multiple of row_alignment]

A value is ``scale * u + bias``, computed in fp32, for the unsigned B-bit code ``u``. The 8-bit
rows carry the same two fp16 parameters at the front as the 4- and 2-bit ones (torch.ao's byte
rows differ: fp32 parameters after the codes). Codes are packed low bits first (element 2k in
the low nibble of byte k at 4 bits), which is qembed's packing at these widths, so codes are
copied. The TBE pads rows to ``row_alignment`` bytes (its default: 16 on GPU, 1 on CPU;
TorchRec passes 16 on both) and starts each table at a multiple of 128 bytes; a TBE built with
``reverse_qparam=True`` keeps scale and bias after the codes. :func:`fill_tbe` and
:func:`from_tbe` go through the TBE's own per-table views, so all of that is the TBE's
business; :func:`to_fbgemm_rows` writes whole rows at a given alignment.

From qembed to FBGEMM (any qembed table: ``QuantizedEmbeddingBag`` / ``QuantizedEmbedding``
of every format, ``LowPrecisionEmbeddingBag`` / ``LowPrecisionEmbedding``):

* widths FBGEMM lacks are stored in the next width it has, each code widened with zero high
  bits, which is exact: 1 bit as 2, 3 as 4, 5, 6 and 7 as 8 (:func:`storage_bits`). Reading
  back with ``bits=`` narrows them again (exact; an error if a code does not fit).
* the symmetric formats (value ``step * q``, q in [Qn, Qp]) become affine exactly: the stored
  code already is ``u = q - Qn``; ``scale = step``, ``bias = step * Qn``.
* scale and bias become fp16, rounded to nearest: the only loss. Rounding to fp16 moves ``x``
  by at most ``max(|x| * 2^-11, 2^-25)`` (2^-25: half the spacing of fp16's subnormals, which
  lie below 6.1e-5). An affine value ``scale * u + bias`` therefore moves by at most
  ``u * |scale - fp16(scale)| + |bias - fp16(bias)|``. For the symmetric formats the bias is
  written as ``fp16(step) * Qn``, exact since Qn is a power of two, so a value ``step * q``
  becomes exactly ``fp16(step) * q``: it moves by ``|q| * |step - fp16(step)|``, at most
  2^-11 of it where the step is at least 6.1e-5. A scale or bias beyond fp16's range (65504)
  raises an error. A pooled output moves by the sum of its rows' moves (times the
  per-sample weights, over the bag length for ``mean``).

From FBGEMM to qembed nothing is lost (fp16 values are fp32 values): the affine format takes
any rows; the symmetric ones take rows whose bias is ``scale * Qn`` (``symmetric_table``: and
one scale for all rows), else an error names the first row that is not.

``padding_idx`` has no FBGEMM counterpart: tables that have one are refused.

fbgemm_gpu is imported only by the functions that build or read a TBE (install
``qembed[torchrec]``, or ``qembed[torchrec-cpu]`` on CPU-only machines).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import ops, reference
from ._checks import check_bits_dim
from .formats import code_bytes, format_id, param_offset, qmin, row_bytes
from .nn.lowp import LowPrecisionEmbeddingBag, _LowPrecisionTable
from .nn.quantized import QuantizedEmbeddingBag, _QuantizedTable

FBGEMM_BITS = (8, 4, 2)
_SCALE_BIAS_BYTES = 4  # fp16 scale, fp16 bias
_CHUNK_ROWS = 1 << 16  # rows re-packed at a time: no [R, D] intermediate for large tables
_POOLINGS = {"sum": "SUM", "mean": "MEAN", "none": "NONE"}
_OUTPUT_TYPES = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}


def storage_bits(bits: int) -> int:
    """The FBGEMM width that stores qembed codes of ``bits`` bits: 1, 2 -> 2; 3, 4 -> 4;
    5..8 -> 8."""
    check_bits_dim(bits, 8)
    return next(b for b in reversed(FBGEMM_BITS) if b >= bits)


def _repack(codes: torch.Tensor, from_bits: int, to_bits: int, dim: int) -> torch.Tensor:
    """Packed codes [R, dim*from_bits/8] -> [R, dim*to_bits/8], same code values."""
    if from_bits == to_bits:
        return codes.contiguous().clone()
    out = torch.empty(codes.shape[0], code_bytes(dim, to_bits), dtype=torch.uint8,
                      device=codes.device)
    for start in range(0, codes.shape[0], _CHUNK_ROWS):
        values = ops.unpack(codes[start:start + _CHUNK_ROWS].contiguous(), from_bits, dim)
        if to_bits < from_bits and values.numel() and int(values.max()) >= 1 << to_bits:
            row = start + int((values >= 1 << to_bits).any(1).nonzero()[0])
            raise ValueError(f"row {row} has a code that does not fit in {to_bits} bits; "
                             f"read the table at a width of at least {from_bits} bits")
        out[start:start + _CHUNK_ROWS] = ops.pack(values, to_bits)
    return out


def _check_table(table: nn.Module) -> None:
    if not isinstance(table, (_QuantizedTable, _LowPrecisionTable)):
        raise TypeError(f"qembed.fbgemm: expected a qembed QuantizedEmbeddingBag, "
                        f"QuantizedEmbedding, LowPrecisionEmbeddingBag or LowPrecisionEmbedding, "
                        f"got {type(table).__name__}")
    if table.padding_idx is not None:
        raise ValueError(f"qembed.fbgemm: the table has padding_idx={table.padding_idx}, which "
                         "FBGEMM's tables do not have (its row would be looked up and counted)")


# --- one table ------------------------------------------------------------------------------


@torch.no_grad()
def to_fbgemm(table: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale_bias)`` of a qembed table in FBGEMM's form: codes uint8
    ``[R, dim * B / 8]`` at B = ``storage_bits(table.bits)`` and scale_bias uint8 ``[R, 4]``
    (fp16 scale then fp16 bias), the pair that a TBE's ``weight_lists`` and TorchRec's
    ``table_name_to_quantized_weights`` take. Exact but for the fp16 rounding of scale and
    bias described in the module's docstring."""
    _check_table(table)
    bits, dim = table.bits, table.embedding_dim
    scale, bias, code_offset = reference.row_params(table.qweight, bits, dim, table.format,
                                                    table.step)
    scale16 = scale.to(torch.float16)
    if code_offset:  # symmetric: bias 0 and code_offset = Qn, a power of two: exact
        bias = scale16.to(torch.float32) * code_offset
    bias16 = bias.to(torch.float16)
    finite = torch.isfinite(scale16) & torch.isfinite(bias16)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise ValueError(f"qembed.fbgemm: row {row}'s scale {float(scale[row])!r} or bias "
                         f"{float(bias[row])!r} is beyond fp16's "
                         "range (65504), in which FBGEMM stores them")
    codes = _repack(table.qweight[:, :code_bytes(dim, bits)], bits, storage_bits(bits), dim)
    scale_bias = torch.stack([scale16, bias16], dim=1).view(torch.uint8)
    return codes, scale_bias


def to_fbgemm_rows(table: nn.Module, row_alignment: int = 16) -> torch.Tensor:
    """A qembed table as whole FBGEMM rows, uint8 ``[R, 4 + dim * B / 8]`` rounded up to a
    multiple of ``row_alignment`` bytes: fp16 scale, fp16 bias, codes, zero padding."""
    if row_alignment < 1:
        raise ValueError(f"qembed.fbgemm: row_alignment must be positive, got {row_alignment}")
    codes, scale_bias = to_fbgemm(table)
    width = _SCALE_BIAS_BYTES + codes.shape[1]
    rows = torch.zeros(codes.shape[0], -(-width // row_alignment) * row_alignment,
                       dtype=torch.uint8, device=codes.device)
    rows[:, :_SCALE_BIAS_BYTES] = scale_bias
    rows[:, _SCALE_BIAS_BYTES:width] = codes
    return rows


def _new_table(cls: type, num_embeddings: int, dim: int, bits: int, fmt: str, device,
               kwargs: dict) -> nn.Module:
    """An empty module of `cls` whose qweight (and step) the caller overwrites."""
    if isinstance(cls, type) and issubclass(cls, _LowPrecisionTable):
        if fmt == "affine":
            raise ValueError("qembed.fbgemm: low-precision tables hold symmetric codes; pass "
                             "format='symmetric' or 'symmetric_table'")
        step_per = "row" if fmt == "symmetric" else "table"
        # Built on the device (its optimizer state and counters initialised as usual); its
        # initial table is drawn chunk by chunk and then replaced.
        return cls(num_embeddings, dim, device=device, bits=bits, step_per=step_per, **kwargs)
    if isinstance(cls, type) and issubclass(cls, _QuantizedTable):
        # Built on the meta device, so no fp32 table is ever made.
        module = cls(num_embeddings, dim, device="meta", bits=bits, format=fmt, **kwargs)
        return module.to_empty(device=device)
    raise TypeError(f"qembed.fbgemm: cls must be a qembed quantized or low-precision table "
                    f"class, got {cls!r}")


@torch.no_grad()
def from_fbgemm(codes: torch.Tensor, scale_bias: torch.Tensor, fbgemm_bits: int, *,
                bits: int | None = None, format: str = "affine",
                cls: type = QuantizedEmbeddingBag, **kwargs) -> nn.Module:
    """A qembed table (``cls``, default :class:`~qembed.QuantizedEmbeddingBag`; other
    arguments such as ``mode`` go to its constructor) from FBGEMM's ``codes`` uint8
    ``[R, dim * fbgemm_bits / 8]`` and ``scale_bias`` uint8 ``[R, 4]`` (fp16 scale, fp16
    bias). Exact.

    ``bits`` (default ``fbgemm_bits``) may be narrower when every code fits, e.g. 3 for a
    3-bit table stored as INT4. ``format="symmetric"`` needs every row's bias to equal
    ``scale * Qn`` with a positive scale, ``"symmetric_table"`` also one scale for all rows;
    ``cls=LowPrecisionEmbeddingBag`` takes those two (as ``step_per="row"`` / ``"table"``),
    with fresh optimizer state.
    """
    if fbgemm_bits not in FBGEMM_BITS:
        raise ValueError(f"qembed.fbgemm: FBGEMM's integer rows have 8, 4 or 2 bits, got "
                         f"{fbgemm_bits!r}")
    bits = fbgemm_bits if bits is None else bits
    format_id(format)
    if not isinstance(bits, int) or not 1 <= bits <= fbgemm_bits:
        raise ValueError(f"qembed.fbgemm: bits must be in 1..{fbgemm_bits} to read "
                         f"{fbgemm_bits}-bit rows, got {bits!r}")
    for name, t in (("codes", codes), ("scale_bias", scale_bias)):
        if t.dtype != torch.uint8 or t.dim() != 2:
            raise ValueError(f"qembed.fbgemm: {name} must be a 2-D uint8 tensor, got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
    num_rows = codes.shape[0]
    if tuple(scale_bias.shape) != (num_rows, _SCALE_BIAS_BYTES):
        raise ValueError(f"qembed.fbgemm: scale_bias must be [{num_rows}, 4] (fp16 scale and "
                         f"bias per row), got {tuple(scale_bias.shape)}")
    dim = codes.shape[1] * 8 // fbgemm_bits
    check_bits_dim(bits, dim)
    params = scale_bias.contiguous().view(torch.float16).to(torch.float32)
    scale, bias = params[:, 0], params[:, 1]
    step = _symmetric_steps(scale, bias, bits, format)
    module = _new_table(cls, num_rows, dim, bits, format, codes.device, kwargs)
    qweight = torch.zeros(num_rows, row_bytes(dim, bits, format), dtype=torch.uint8,
                          device=codes.device)
    qweight[:, :code_bytes(dim, bits)] = _repack(codes, fbgemm_bits, bits, dim)
    po = param_offset(dim, bits)
    if format == "affine":
        qweight[:, po:] = torch.stack([scale, bias], dim=1).view(torch.uint8)
    elif format == "symmetric":
        qweight[:, po:] = step.view(torch.uint8).view(num_rows, 4)
    module.qweight = ops.table_zeros(*qweight.shape, device=codes.device).copy_(qweight)
    if format == "symmetric_table":
        module.step = step.reshape(1).clone()
    return module


def _symmetric_steps(scale: torch.Tensor, bias: torch.Tensor, bits: int,
                     fmt: str) -> torch.Tensor | None:
    """The steps of affine rows that are symmetric ones (bias = scale * Qn): [R] for
    "symmetric", [1] for "symmetric_table", None for "affine"; an error where they are not."""
    if fmt == "affine":
        return None
    bad = ~((bias == scale * qmin(bits)) & (scale > 0) & torch.isfinite(scale))
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"qembed.fbgemm: row {row} (scale {float(scale[row])!r}, bias "
                         f"{float(bias[row])!r}) is not a symmetric {bits}-bit row, whose bias "
                         f"is scale * {qmin(bits)} with a positive scale; read it as 'affine'")
    if fmt == "symmetric":
        return scale.contiguous()
    if scale.numel() == 0:
        return torch.ones(1, device=scale.device)
    if bool((scale != scale[0]).any()):
        row = int((scale != scale[0]).nonzero()[0])
        raise ValueError(f"qembed.fbgemm: row {row}'s scale {float(scale[row])!r} differs from "
                         f"row 0's {float(scale[0])!r}: 'symmetric_table' has one step per "
                         "table; read it as 'symmetric'")
    return scale[:1].clone()


def from_fbgemm_rows(rows: torch.Tensor, fbgemm_bits: int, dim: int, **kwargs) -> nn.Module:
    """:func:`from_fbgemm` for whole FBGEMM rows uint8 ``[R, >= 4 + dim * fbgemm_bits / 8]``
    (fp16 scale and bias first; any padding after the codes is ignored)."""
    if fbgemm_bits not in FBGEMM_BITS:
        raise ValueError(f"qembed.fbgemm: FBGEMM's integer rows have 8, 4 or 2 bits, got "
                         f"{fbgemm_bits!r}")
    width = _SCALE_BIAS_BYTES + code_bytes(dim, fbgemm_bits)
    if rows.dim() != 2 or rows.shape[1] < width:
        raise ValueError(f"qembed.fbgemm: rows of shape {tuple(rows.shape)} are too narrow for "
                         f"dim={dim} at {fbgemm_bits} bits ({width} bytes)")
    return from_fbgemm(rows[:, _SCALE_BIAS_BYTES:width], rows[:, :_SCALE_BIAS_BYTES],
                       fbgemm_bits, **kwargs)


# --- table-batched embeddings (several tables) ----------------------------------------------


def _fbgemm_types():
    try:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )
    except ImportError as e:
        raise ImportError("qembed.fbgemm: this needs fbgemm_gpu (pip install fbgemm-gpu-cpu, "
                          "or qembed[torchrec])") from e
    return SparseType, EmbeddingLocation, PoolingMode, IntNBitTableBatchedEmbeddingBagsCodegen


def sparse_type(bits: int):
    """fbgemm_gpu's ``SparseType`` that stores qembed codes of ``bits`` bits."""
    SparseType = _fbgemm_types()[0]
    return {8: SparseType.INT8, 4: SparseType.INT4, 2: SparseType.INT2}[storage_bits(bits)]


def _table_mode(table: nn.Module) -> str:
    return getattr(table, "mode", "none")


def _per_table(value, count: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"qembed.fbgemm: {what} has {len(value)} entries for {count} tables")
        return list(value)
    return [value] * count


def to_tbe(tables: Sequence[nn.Module], *, feature_table_map: Sequence[int] | None = None,
           pooling: str | None = None, output_dtype: torch.dtype = torch.float32,
           names: Sequence[str] | None = None, **tbe_kwargs):
    """An ``IntNBitTableBatchedEmbeddingBagsCodegen`` on the tables' device serving qembed
    ``tables`` (see :func:`fill_tbe`). ``feature_table_map[f]`` is the table of feature f
    (default: one feature per table); ``pooling`` is ``"sum"``, ``"mean"`` or ``"none"``, by
    default the tables' own ``mode`` (which must then agree); other arguments
    (``row_alignment``, ``bounds_check_mode``...) go to the TBE."""
    SparseType, EmbeddingLocation, PoolingMode, TBE = _fbgemm_types()
    tables = list(tables)
    if not tables:
        raise ValueError("qembed.fbgemm: to_tbe needs at least one table")
    for t in tables:
        _check_table(t)
    devices = {t.qweight.device for t in tables}
    if len(devices) != 1:
        raise ValueError(f"qembed.fbgemm: the tables are on different devices {sorted(map(str, devices))}")
    device = devices.pop()
    if pooling is None:
        modes = {_table_mode(t) for t in tables}
        if len(modes) != 1:
            raise ValueError(f"qembed.fbgemm: the tables pool differently {sorted(modes)}; a TBE "
                             "pools all its features one way: pass pooling= or build one per mode")
        pooling = modes.pop()
    if pooling not in _POOLINGS:
        raise ValueError(f"qembed.fbgemm: pooling must be one of {sorted(_POOLINGS)}, got {pooling!r}")
    if output_dtype not in _OUTPUT_TYPES:
        raise TypeError(f"qembed.fbgemm: output_dtype must be one of {list(_OUTPUT_TYPES)}, "
                        f"got {output_dtype}")
    names = [f"table_{i}" for i in range(len(tables))] if names is None else list(names)
    if len(names) != len(tables):
        raise ValueError(f"qembed.fbgemm: {len(names)} names for {len(tables)} tables")
    location = EmbeddingLocation.HOST if device.type == "cpu" else EmbeddingLocation.DEVICE
    specs = [(name, t.num_embeddings, t.embedding_dim, sparse_type(t.bits), location)
             for name, t in zip(names, tables)]
    tbe = TBE(specs, feature_table_map=None if feature_table_map is None else list(feature_table_map),
              pooling_mode=getattr(PoolingMode, _POOLINGS[pooling]), device=device,
              output_dtype=getattr(SparseType, _OUTPUT_TYPES[output_dtype]), **tbe_kwargs)
    fill_tbe(tbe, tables)
    return tbe


@torch.no_grad()
def fill_tbe(tbe, tables: Sequence[nn.Module]) -> None:
    """Write qembed ``tables`` (one per table of the TBE, in order) into an
    ``IntNBitTableBatchedEmbeddingBagsCodegen`` whose tables have the same rows and dimension
    and the FBGEMM type :func:`sparse_type` gives for each table's bits. Values as
    :func:`to_fbgemm`."""
    tables = list(tables)
    specs = tbe.embedding_specs
    if len(tables) != len(specs):
        raise ValueError(f"qembed.fbgemm: {len(tables)} tables for a TBE of {len(specs)}")
    for t in tables:
        _check_table(t)
    for (name, rows, dim, weight_ty, _), t in zip(specs, tables):
        want = sparse_type(t.bits)
        if (rows, dim) != (t.num_embeddings, t.embedding_dim) or weight_ty.value != want.value:
            raise ValueError(f"qembed.fbgemm: TBE table {name!r} is {rows} x {dim} {weight_ty.name}; "
                             f"the qembed table is {t.num_embeddings} x {t.embedding_dim} at "
                             f"{t.bits} bits, stored as {want.name}")
    tbe.initialize_weights()
    for (name, *_), t, (codes, scale_bias) in zip(specs, tables, tbe.split_embedding_weights()):
        try:
            new_codes, new_scale_bias = to_fbgemm(t)
        except ValueError as e:
            raise ValueError(f"TBE table {name!r}: {e}") from e
        codes.copy_(new_codes)
        scale_bias.copy_(new_scale_bias)


def from_tbe(tbe, *, bits: int | Sequence[int | None] | None = None,
             format: str | Sequence[str] = "affine", cls: type = QuantizedEmbeddingBag,
             **kwargs) -> list[nn.Module]:
    """The tables of an ``IntNBitTableBatchedEmbeddingBagsCodegen`` (INT8, INT4 or INT2) as
    qembed tables, exactly (see :func:`from_fbgemm`); ``bits`` and ``format`` for all tables
    or one per table. Bag classes get the TBE's pooling as their ``mode``."""
    SparseType, _, PoolingMode, _ = _fbgemm_types()
    if tbe.index_remappings_array.numel() or tbe.index_remapping_hash_table.numel() or \
            tbe.index_remapping_hash_table_cpu is not None:
        raise ValueError("qembed.fbgemm: the TBE remaps indices (pruned tables), which qembed's "
                         "tables do not do")
    specs = tbe.embedding_specs
    bits_list = _per_table(bits, len(specs), "bits")
    formats = _per_table(format, len(specs), "format")
    if isinstance(cls, type) and issubclass(cls, (QuantizedEmbeddingBag, LowPrecisionEmbeddingBag)):
        mode = {int(PoolingMode.SUM): "sum", int(PoolingMode.MEAN): "mean"}.get(int(tbe.pooling_mode))
        if mode is None:
            raise ValueError(f"qembed.fbgemm: {cls.__name__} pools by sum or mean; the TBE's "
                             f"pooling is {tbe.pooling_mode}")
        kwargs = {"mode": mode, **kwargs}
    widths = {SparseType.INT8.value: 8, SparseType.INT4.value: 4, SparseType.INT2.value: 2}
    tbe.initialize_weights()
    out = []
    for (name, _, dim, weight_ty, _), (codes, scale_bias), b, fmt in zip(
            specs, tbe.split_embedding_weights(), bits_list, formats):
        if weight_ty.value not in widths:
            raise ValueError(f"qembed.fbgemm: TBE table {name!r} is {weight_ty.name}; qembed "
                             "reads FBGEMM's INT8, INT4 and INT2 tables")
        try:
            out.append(from_fbgemm(codes, scale_bias, widths[weight_ty.value], bits=b,
                                   format=fmt, cls=cls, **kwargs))
        except ValueError as e:
            raise ValueError(f"TBE table {name!r}: {e}") from e
    return out
