"""Triton kernels for ``embedding_bag`` and ``lowp_update``: the GPU path without compiled CUDA
kernels.

The two entry points take the arguments of their ``torch.ops.qembed`` schemas
(csrc/qembed.cpp) and compute what the CPU kernels compute: the lookup up to float
reordering of its sums (mode ``"none"`` exactly), the update bit for bit (codes, steps,
optimizer state; the same Philox stream for stochastic rounding). :mod:`qembed.ops` decides
when they run (see its docstring): on CUDA tensors when the extension has no CUDA kernel for
the op, and on any device inside ``qembed.ops.use_triton()``; on CPU tensors that needs
``TRITON_INTERPRET=1`` set before triton is imported, which is how the tests run them.

Argument checks raise the CPU kernels' exceptions. Checking the values of indices, offsets
and ``unique_rows`` needs them on the host: on a CUDA device that costs a synchronisation, so
there (as in the CUDA kernels) out-of-range indices and rows are skipped and offsets clamped
without a word unless ``QEMBED_CUDA_VALIDATE=1``; on CPU tensors they are always checked.
"""
from __future__ import annotations

import os

import torch

from ..formats import (
    FORMATS,
    OPTIMIZERS,
    POOLINGS,
    STEP_OPTIMIZERS,
    check_bits_dim,
    check_key_offsets,
    row_bytes,
)
from . import lookup, update

__all__ = ["embedding_bag", "lowp_update"]


def _fail(exc, *parts):
    raise exc("".join(str(p) for p in parts))


def _dtype_name(dtype: torch.dtype) -> str:
    """The name c10 gives a dtype in messages (Float, Long, ...)."""
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
            torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
            torch.bool: "Bool"}.get(dtype, str(dtype))


def _same_device(a, an, b, bn):
    if a.device != b.device:
        _fail(ValueError, "qembed: ", an, " is on ", a.device, " but ", bn, " is on ", b.device)


def _check_rows(rows, dim, bits, fmt):
    if not 1 <= bits <= 8:
        _fail(ValueError, "qembed: bits must be in 1..8, got ", bits)
    check_bits_dim(bits, dim)
    if fmt not in FORMATS.values():
        _fail(ValueError, "qembed: unknown format ", fmt)
    if rows.dtype != torch.uint8:
        _fail(TypeError, "qembed: packed rows must be uint8, got ", _dtype_name(rows.dtype))
    if rows.dim() != 2:
        _fail(ValueError, "qembed: packed rows must be 2-D, got ", rows.dim(), "-D")
    expect = row_bytes(dim, bits, fmt)
    if rows.shape[1] != expect:
        _fail(ValueError, "qembed: packed rows have ", rows.shape[1], " bytes but dim=", dim,
              ", bits=", bits, ", format=", fmt, " needs ", expect)


def _check_table_step(step, fmt, rows):
    if fmt != FORMATS["symmetric_table"]:
        return
    if step is None or step.numel() != 1:
        _fail(ValueError, "qembed: format 1 (per-table step) needs a step tensor with one element")
    if step.dtype != torch.float32:
        _fail(TypeError, "qembed: step must be float32, got ", _dtype_name(step.dtype))
    _same_device(step, "step", rows, "rows")


def _check_index_dtype(t, name):
    if t.dtype not in (torch.int32, torch.int64):
        _fail(TypeError, "qembed: ", name, " must be int32 or int64, got ", _dtype_name(t.dtype))
    if t.dim() != 1:
        _fail(ValueError, "qembed: ", name, " must be 1-D, got ", t.dim(), "-D")


def _validating(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("QEMBED_CUDA_VALIDATE") == "1"


def _word_aligned(rows: torch.Tensor) -> torch.Tensor:
    """The kernels access parameters as fp32, so rows must start on a 4-byte boundary (a view
    can start anywhere in its storage): otherwise a copy."""
    rows = rows.contiguous()
    return rows if rows.data_ptr() % 4 == 0 else rows.clone()


def _first(mask: torch.Tensor) -> int:
    """Position of the first True in mask, or -1."""
    hits = mask.nonzero()
    return int(hits[0, 0]) if hits.numel() else -1


def _validate_lookup(indices, offsets, num_rows, pooled):
    idx = indices.long()
    i = _first((idx < 0) | (idx >= num_rows))
    if i >= 0:
        _fail(IndexError, "qembed.embedding_bag: index ", int(idx[i]), " at position ", i,
              " is out of range for a table of ", num_rows, " rows")
    if not pooled or not offsets.numel():
        return
    off, n = offsets.long(), indices.numel()
    if int(off[0]) != 0:
        _fail(ValueError, "qembed.embedding_bag: offsets[0] must be 0, got ", int(off[0]))
    b = _first(off[1:] < off[:-1]) + 1
    if b > 0:
        _fail(ValueError, "qembed.embedding_bag: offsets must be non-decreasing, but offsets[",
              b, "] = ", int(off[b]), " < offsets[", b - 1, "] = ", int(off[b - 1]))
    b = _first(off > n)
    if b >= 0:
        _fail(ValueError, "qembed.embedding_bag: offsets[", b, "] = ", int(off[b]),
              " is past the end of indices (", n, ")")


def embedding_bag(rows, indices, offsets, per_sample_weights, step, bits, dim, fmt, mode,
                  include_last_offset, padding_idx, output_dtype):
    """``torch.ops.qembed.embedding_bag`` in Triton."""
    _check_rows(rows, dim, bits, fmt)
    _check_table_step(step, fmt, rows)
    if mode not in POOLINGS.values():
        _fail(ValueError, "qembed: mode must be 0 (sum), 1 (mean) or 2 (none), got ", mode)
    if output_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _fail(TypeError, "qembed: output dtype must be float32, float16 or bfloat16, got ",
              _dtype_name(output_dtype))
    _check_index_dtype(indices, "indices")
    _same_device(indices, "indices", rows, "the table")
    psw = per_sample_weights
    if psw is not None:
        if mode == POOLINGS["mean"]:
            _fail(ValueError, "qembed: per_sample_weights are only supported with mode 'sum' "
                  "or 'none'")
        if psw.dim() != 1 or psw.numel() != indices.numel():
            _fail(ValueError, "qembed: per_sample_weights must have the shape of indices (",
                  indices.numel(), ",), got ", list(psw.shape))
        if psw.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            _fail(TypeError, "qembed: per_sample_weights must be floating point, got ",
                  _dtype_name(psw.dtype))
        _same_device(psw, "per_sample_weights", rows, "the table")
        psw = psw.contiguous()
    pooled = mode != POOLINGS["none"]
    if pooled:
        _check_index_dtype(offsets, "offsets")
        _same_device(offsets, "offsets", rows, "the table")
        if include_last_offset and not offsets.numel():
            _fail(ValueError, "qembed: with include_last_offset, offsets needs at least one "
                  "element")
        num_out = offsets.numel() - (1 if include_last_offset else 0)
    else:
        num_out = indices.numel()
    if _validating(rows.device):
        _validate_lookup(indices, offsets, rows.shape[0], pooled)
    out = torch.empty(num_out, dim, dtype=output_dtype, device=rows.device)
    return lookup.launch(_word_aligned(rows), indices.contiguous(), offsets.contiguous(), psw,
                         step, bits, dim, fmt, mode, padding_idx, out)


def _check_f32(t, name, n0, n1):
    if t.dtype != torch.float32:
        _fail(TypeError, "qembed.lowp_update: ", name, " must be float32, got ",
              _dtype_name(t.dtype))
    if t.dim() != 2 or tuple(t.shape) != (n0, n1) or not t.is_contiguous():
        _fail(ValueError, "qembed.lowp_update: ", name, " must be a contiguous [", n0, ", ", n1,
              "] tensor, got ", list(t.shape))


def lowp_update(rows, step, state, step_state, unique_rows, grad_rows, weights, weights_out,
                bits, dim, fmt, optimizer, lr, eps, weight_decay, beta1, beta2, iteration,
                learn_step, step_optimizer, step_lr, stochastic, seed, counter, row_offset=0,
                column_offset=0):
    """``torch.ops.qembed.lowp_update`` in Triton: in place; returns the number of rows skipped
    for a non-finite gradient (int64 scalar tensor on the table's device)."""
    _check_rows(rows, dim, bits, fmt)
    check_key_offsets(row_offset, column_offset, "qembed.lowp_update")
    if fmt == FORMATS["affine"]:
        _fail(ValueError, "qembed.lowp_update: training needs a symmetric format")
    if not rows.is_contiguous():
        _fail(ValueError, "qembed.lowp_update: rows must be contiguous")
    _check_table_step(step, fmt, rows)
    if optimizer not in OPTIMIZERS.values():
        _fail(ValueError, "qembed.lowp_update: optimizer must be 0 (sgd), 1 (adagrad), 2 (adam) "
              "or 3 (none), got ", optimizer)
    if step_optimizer not in STEP_OPTIMIZERS.values():
        _fail(ValueError, "qembed.lowp_update: step_optimizer must be 0 (sgd) or 1 (adam), got ",
              step_optimizer)
    if iteration < 1:
        _fail(ValueError, "qembed.lowp_update: iteration counts from 1, got ", iteration)
    _check_index_dtype(unique_rows, "unique_rows")
    num_rows, u = rows.shape[0], unique_rows.numel()
    uniq, grad = unique_rows.contiguous(), grad_rows.contiguous()
    _check_f32(grad, "grad_rows", u, dim)
    width = {OPTIMIZERS["adagrad"]: 1, OPTIMIZERS["adam"]: 2 * dim}.get(optimizer, 0)
    if width:
        _check_f32(state, "state", num_rows, width)
    if learn_step and step_optimizer == STEP_OPTIMIZERS["adam"]:
        _check_f32(step_state, "step_state", num_rows if fmt == FORMATS["symmetric"] else 1, 2)
    for t, name in ((weights, "weights"), (weights_out, "weights_out")):
        if t is not None:
            _check_f32(t, name, u, dim)
    for t, name in ((state, "state"), (step_state, "step_state"), (uniq, "unique_rows"),
                    (grad_rows, "grad_rows"), (weights, "weights"), (weights_out, "weights_out")):
        if t is not None:
            _same_device(t, name, rows, "rows")
    if _validating(rows.device) and u:
        r = uniq.long()
        k = _first((r < 0) | (r >= num_rows))
        if k >= 0:
            _fail(IndexError, "qembed.lowp_update: row ", int(r[k]), " is out of range for a "
                  "table of ", num_rows, " rows")
        if _first(r[1:] <= r[:-1]) >= 0:
            _fail(ValueError, "qembed.lowp_update: unique_rows must be strictly increasing (as "
                  "embedding_bag_backward returns them)")
    table = _word_aligned(rows)
    skipped = update.launch(table, step, state, step_state, uniq, grad, weights, weights_out,
                            bits, dim, fmt, optimizer, lr, eps, weight_decay, beta1, beta2,
                            iteration, learn_step, step_optimizer, step_lr, stochastic, seed,
                            counter, row_offset, column_offset)
    if table is not rows:
        rows.copy_(table)
    return skipped
