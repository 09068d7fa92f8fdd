"""``embedding_bag`` in Triton: fused gather-dequantize-pool over packed rows.

A program pools one bag over a block of columns, BLOCK_N of the bag's rows at a time: their
codes are gathered as a [BLOCK_N, BLOCK_D] tile, scaled by psw * scale and summed over the
rows in fp32. As in the CPU kernel the raw codes are accumulated and each row's constant
part psw * (scale * offset + bias) is summed once per bag. Mode "none" writes each row's
values exactly as the CPU kernel rounds them: (scale * (u + offset) + bias) * psw.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_indices_values, check_lookup_args, check_offsets_values
from ..formats import FORMATS, POOLINGS, code_bytes, param_offset, qmin
from .common import f32_at, load_codes, validating, word_aligned

SYM_ROW, AFFINE = tl.constexpr(FORMATS["symmetric"]), tl.constexpr(FORMATS["affine"])
POOL_MEAN, POOL_NONE = POOLINGS["mean"], POOLINGS["none"]
BLOCK_N = 16  # rows of a bag gathered at once
MAX_BLOCK_D = 256  # wider rows go in several column blocks (the grid's second axis)


@triton.jit
def _row_params(rows, base, live, step, FMT: tl.constexpr, PARAM_OFFSET: tl.constexpr):
    """(scale, bias) of the rows at byte offsets base; value = scale * (u + offset) + bias."""
    if FMT == AFFINE:  # fp32 scale and bias inline
        scale = tl.load(f32_at(rows + base + PARAM_OFFSET), mask=live, other=0.0)
        bias = tl.load(f32_at(rows + base + PARAM_OFFSET + 4), mask=live, other=0.0)
    elif FMT == SYM_ROW:  # fp32 step inline
        scale = tl.load(f32_at(rows + base + PARAM_OFFSET), mask=live, other=0.0)
        bias = tl.zeros_like(scale)
    else:  # one step for the table
        scale = tl.zeros_like(base.to(tl.float32)) + tl.load(step)
        bias = tl.zeros_like(scale)
    return scale, bias


@triton.jit
def _pool_kernel(rows, stride, num_rows, indices, n, offsets, num_offsets, psw, step, out,
                 DIM, padding_idx, BITS: tl.constexpr, FMT: tl.constexpr, OFFSET: tl.constexpr,
                 CODE_BYTES: tl.constexpr, PARAM_OFFSET: tl.constexpr, MEAN: tl.constexpr,
                 HAS_PSW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bag = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    # Bad offsets are clamped, never read through (the bag becomes shorter or empty).
    start = tl.load(offsets + bag).to(tl.int64)
    end = tl.load(offsets + bag + 1, mask=bag + 1 < num_offsets, other=n).to(tl.int64)
    start = tl.minimum(tl.maximum(start, 0), n)
    end = tl.minimum(tl.maximum(end, start), n)

    acc = tl.zeros([BLOCK_D], tl.float32)
    shift = 0.0  # the rows' constant terms
    count = 0
    for p0 in range(start, end, BLOCK_N):
        p = p0 + tl.arange(0, BLOCK_N)
        in_bag = p < end
        r = tl.load(indices + p, mask=in_bag, other=0).to(tl.int64)
        # padding and (unvalidated) out-of-range indices are skipped
        live = in_bag & (r != padding_idx) & (r >= 0) & (r < num_rows)
        base = tl.where(live, r, 0) * stride
        if HAS_PSW:
            w = tl.load(psw + p, mask=live, other=0.0).to(tl.float32)
        else:
            w = tl.where(live, 1.0, 0.0)
        scale, bias = _row_params(rows, base, live, step, FMT, PARAM_OFFSET)
        a = tl.where(live, w * scale, 0.0)
        u = load_codes((rows + base)[:, None], d[None, :], live[:, None] & d_ok[None, :], BITS,
                       CODE_BYTES)
        acc += tl.sum(a[:, None] * u.to(tl.float32), axis=0)
        shift += tl.sum(tl.where(live, a * OFFSET + w * bias, 0.0), axis=0)
        count += tl.sum(live.to(tl.int32), axis=0)
    factor = 1.0
    if MEAN:
        factor = tl.where(count > 0, tl.div_rn(1.0, tl.maximum(count, 1).to(tl.float32)), 1.0)
    value = (acc + shift) * factor
    tl.store(out + bag.to(tl.int64) * DIM + d, value.to(out.dtype.element_ty), mask=d_ok)


@triton.jit
def _rows_kernel(rows, stride, num_rows, indices, n, psw, step, out, DIM, padding_idx,
                 BITS: tl.constexpr, FMT: tl.constexpr, OFFSET: tl.constexpr,
                 CODE_BYTES: tl.constexpr, PARAM_OFFSET: tl.constexpr, HAS_PSW: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    in_range = p < n
    r = tl.load(indices + p, mask=in_range, other=0).to(tl.int64)
    live = in_range & (r != padding_idx) & (r >= 0) & (r < num_rows)
    base = tl.where(live, r, 0) * stride
    scale, bias = _row_params(rows, base, live, step, FMT, PARAM_OFFSET)
    u = load_codes((rows + base)[:, None], d[None, :], live[:, None] & d_ok[None, :], BITS,
                   CODE_BYTES)
    value = scale[:, None] * (u + OFFSET).to(tl.float32) + bias[:, None]
    value = tl.where(live[:, None], value, 0.0)
    if HAS_PSW:
        value = value * tl.load(psw + p, mask=in_range, other=0.0).to(tl.float32)[:, None]
    tl.store(out + p[:, None] * DIM + d[None, :], value.to(out.dtype.element_ty),
             mask=in_range[:, None] & d_ok[None, :])


def embedding_bag(rows, indices, offsets, per_sample_weights, step, bits, dim, fmt, mode,
                  include_last_offset, padding_idx, output_dtype):
    """``torch.ops.qembed.embedding_bag`` in Triton."""
    num_out = check_lookup_args(rows, indices, offsets, per_sample_weights, step, bits, dim, fmt,
                                mode, include_last_offset, output_dtype)
    pooled = mode != POOL_NONE
    if validating(rows.device):
        check_indices_values(indices, rows.shape[0])
        if pooled:
            check_offsets_values(offsets, indices.numel())
    psw = None if per_sample_weights is None else per_sample_weights.contiguous()
    out = torch.empty(num_out, dim, dtype=output_dtype, device=rows.device)
    return _launch(word_aligned(rows), indices.contiguous(), offsets.contiguous(), psw, step,
                   bits, dim, fmt, mode, padding_idx, out)


def _launch(rows: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
            psw: torch.Tensor | None, step: torch.Tensor | None, bits: int, dim: int, fmt: int,
            mode: int, padding_idx: int, out: torch.Tensor) -> torch.Tensor:
    """Fills out [num outputs, dim]."""
    if out.shape[0] == 0:
        return out
    block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
    common = dict(BITS=bits, FMT=fmt, OFFSET=0 if fmt == FORMATS["affine"] else qmin(bits),
                  CODE_BYTES=code_bytes(dim, bits), PARAM_OFFSET=param_offset(dim, bits),
                  HAS_PSW=psw is not None, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
                  enable_fp_fusion=False)
    table_step = step if fmt == FORMATS["symmetric_table"] else None
    n = indices.numel()
    if mode == POOL_NONE:
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(dim, block_d))
        _rows_kernel[grid](rows, rows.shape[1], rows.shape[0], indices, n, psw, table_step, out,
                           dim, padding_idx, **common)
    else:
        grid = (out.shape[0], triton.cdiv(dim, block_d))
        _pool_kernel[grid](rows, rows.shape[1], rows.shape[0], indices, n, offsets,
                           offsets.numel(), psw, table_step, out, dim, padding_idx,
                           MEAN=mode == POOL_MEAN, **common)
    return out
