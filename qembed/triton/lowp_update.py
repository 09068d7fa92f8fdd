"""``lowp_update`` in Triton: the fused low-precision training step of csrc/cpu/lowp_update.cpp.

A program updates BLOCK_R distinct rows, each row whole in registers: dequantize (or take the
given weights), optimizer step, LSQ step update, re-quantize, every operation in the CPU
kernel's order with correctly rounded division and square root, so that codes, steps and
state come out bit-identical to the CPU's. The row sums (Adagrad's mean of squares, the LSQ
sum) add in the CPU's order, 16 partial sums then their halves (common.lane_sum), which costs
O(D / 16) reductions per row.

With one step per table and learn_step, the step moves by the sum of every row's LSQ term in
row order before any row is re-quantized: the update kernel keeps the rows' weights and LSQ
terms, a one-program kernel sums the terms sequentially and moves the step, and a third
kernel re-quantizes the rows with it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import check_update_args, check_update_rows_values
from ..formats import FORMATS, OPTIMIZERS, code_bytes, padded_dim, param_offset, qmax, qmin
from .common import (
    f32_at,
    lane_sum,
    load_codes,
    philox_uniform,
    rint,
    store_codes,
    validating,
    word_aligned,
)

_SGD, _ADAGRAD, _ADAM = (tl.constexpr(OPTIMIZERS[name]) for name in ("sgd", "adagrad", "adam"))
_MIN_STEP = tl.constexpr(reference.MIN_STEP)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
ELEMENTS_PER_PROGRAM = 1024  # BLOCK_R * BLOCK_D: bounds the registers a program holds


@triton.jit
def _next_step(s, gs, st, mask, step_lr, b1, b2, omb1, omb2, bc1, bc2, eps,
               STEP_ADAM: tl.constexpr):
    """The step after one step-optimizer update with gradient gs; st points at the step's
    Adam moments [m, v]."""
    delta = gs
    if STEP_ADAM:
        m = b1 * tl.load(st, mask=mask, other=0.0) + omb1 * gs
        v = b2 * tl.load(st + 1, mask=mask, other=0.0) + omb2 * (gs * gs)
        tl.store(st, m, mask=mask)
        tl.store(st + 1, v, mask=mask)
        delta = tl.div_rn(tl.div_rn(m, bc1), tl.sqrt_rn(tl.div_rn(v, bc2)) + eps)
    new = s - step_lr * delta
    return tl.where(new < _MIN_STEP, _MIN_STEP, new)  # NaN passes, as std::max lets it


@triton.jit
def _encode(rows, base, mask, w, s, r, cols, DIM, seed_lo, seed_hi, counter_lo, row_offset,
            column_offset, BITS: tl.constexpr, QN: tl.constexpr, QP: tl.constexpr,
            STOCHASTIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Re-quantizes w [BLOCK_R, BLOCK_D] with steps s into the rows at byte offsets base;
    rounding keys row r and column c as row_offset + r, column_offset + c."""
    x = tl.div_rn(w, s[:, None])
    if STOCHASTIC:
        u = philox_uniform(tl.broadcast_to((r + row_offset)[:, None], (BLOCK_R, BLOCK_D)),
                           tl.broadcast_to((cols + column_offset)[None, :], (BLOCK_R, BLOCK_D)),
                           seed_lo, seed_hi, counter_lo)
        q = tl.floor(x + u)
    else:
        q = rint(x)
    q = tl.where(q >= QN, tl.where(q > QP, QP, q), QN)  # NaN -> QN, as the CPU
    store_codes(rows + base, q.to(tl.int32) - QN, mask, DIM, BITS, BLOCK_R, BLOCK_D)


@triton.jit
def _update_kernel(rows, stride, num_rows, table_step, state, step_state, uniq, num_unique,
                   grad, weights, kept, lsq, skipped, DIM, lr, eps, wd, step_lr, b1, b2, omb1,
                   omb2, bc1, bc2, row_gscale, seed_lo, seed_hi, counter_lo, row_offset,
                   column_offset, BITS: tl.constexpr, QN: tl.constexpr, QP: tl.constexpr,
                   CODE_BYTES: tl.constexpr, PARAM_OFFSET: tl.constexpr, PER_ROW: tl.constexpr,
                   OPT: tl.constexpr, LEARN: tl.constexpr, STEP_ADAM: tl.constexpr,
                   DEFER: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                   KEEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = k < num_unique
    cols = tl.arange(0, BLOCK_D)
    elem = k_ok[:, None] & (cols < DIM)[None, :]
    at = k[:, None] * DIM + cols[None, :]
    r = tl.load(uniq + k, mask=k_ok, other=0).to(tl.int64)

    g = tl.load(grad + at, mask=elem, other=0.0)
    bad = elem & ~(tl.abs(g) <= _FLT_MAX)  # NaN fails the comparison
    if HAS_WEIGHTS:
        w = tl.load(weights + at, mask=elem, other=0.0)
        bad = bad | (elem & ~(tl.abs(w) <= _FLT_MAX))
    finite = tl.sum(bad.to(tl.int32), axis=1) == 0
    tl.store(skipped + k, (~finite).to(tl.int32), mask=k_ok)
    # rows outside the table (possible only without validation) are left alone
    go = k_ok & finite & (r >= 0) & (r < num_rows)
    live = go[:, None] & (cols < DIM)[None, :]
    base = tl.where(go, r, 0) * stride

    if PER_ROW:
        s = tl.load(f32_at(rows + base + PARAM_OFFSET), mask=go, other=1.0)
    else:
        s = tl.zeros([BLOCK_R], tl.float32) + tl.load(table_step)
    if not HAS_WEIGHTS:
        u = load_codes((rows + base)[:, None], cols[None, :], live, BITS, CODE_BYTES)
        w = tl.where(live, s[:, None] * (u + QN).to(tl.float32), 0.0)  # the pad encodes as 0

    if OPT == _SGD:
        w = w - lr * (g + wd * w)
    elif OPT == _ADAGRAD:  # row-wise
        gd = g + wd * w
        acc = tl.load(state + r, mask=go, other=0.0)
        acc = acc + tl.div_rn(lane_sum(gd * gd, cols[None, :], DIM, BLOCK_R),
                              tl.cast(DIM, tl.float32))
        tl.store(state + r, acc, mask=go)
        w = w - lr * tl.div_rn(gd, (tl.sqrt_rn(acc) + eps)[:, None])
    elif OPT == _ADAM:  # state [m | v]
        gd = g + wd * w
        moments = state + r[:, None] * (2 * DIM) + cols[None, :]
        m = b1 * tl.load(moments, mask=live, other=0.0) + omb1 * gd
        v = b2 * tl.load(moments + DIM, mask=live, other=0.0) + omb2 * (gd * gd)
        tl.store(moments, m, mask=live)
        tl.store(moments + DIM, v, mask=live)
        w = w - lr * tl.div_rn(tl.div_rn(m, bc1), tl.sqrt_rn(tl.div_rn(v, bc2)) + eps)
    if KEEP:
        tl.store(kept + at, tl.where(finite[:, None], w, float("nan")), mask=elem)

    if LEARN:  # LSQ: sum_d g_d * dQ/ds at x = w / s
        x = tl.div_rn(w, s[:, None])
        dq = tl.where(x < QN, QN, tl.where(x > QP, QP, rint(x) - x))
        gs = lane_sum(g * dq, cols[None, :], DIM, BLOCK_R)
        if DEFER:
            tl.store(lsq + k, tl.where(go, gs, 0.0), mask=k_ok)
        else:
            s = _next_step(s, row_gscale * gs, step_state + 2 * r, go, step_lr, b1, b2, omb1,
                           omb2, bc1, bc2, eps, STEP_ADAM)
            tl.store(f32_at(rows + base + PARAM_OFFSET), s, mask=go)
    if not DEFER:
        _encode(rows, base, go, w, s, r, cols, DIM, seed_lo, seed_hi, counter_lo, row_offset,
                column_offset, BITS, QN, QP, STOCHASTIC, BLOCK_R, BLOCK_D)


@triton.jit
def _table_step_kernel(table_step, step_state, lsq, skipped, num_unique, DIM, step_lr, b1, b2,
                       omb1, omb2, bc1, bc2, eps, QP1: tl.constexpr, STEP_ADAM: tl.constexpr):
    """Moves the table's step by the LSQ terms of the rows not skipped, summed in row order
    (a skipped row's term is 0), with LSQ's scale 1 / sqrt(max(Qp, 1) * elements)."""
    gs = 0.0
    num_skipped = 0
    for k in range(num_unique):
        gs += tl.load(lsq + k)
        num_skipped += tl.load(skipped + k)
    n = (num_unique - num_skipped).to(tl.int64)
    ok = n > 0
    gscale = tl.div_rn(1.0, tl.sqrt_rn((n * (QP1 * DIM)).to(tl.float32)))
    s = _next_step(tl.load(table_step), gscale * gs, step_state, ok, step_lr, b1, b2, omb1,
                   omb2, bc1, bc2, eps, STEP_ADAM)
    tl.store(table_step, s, mask=ok)


@triton.jit
def _encode_kernel(rows, stride, num_rows, table_step, uniq, num_unique, kept, skipped, DIM,
                   seed_lo, seed_hi, counter_lo, row_offset, column_offset,
                   BITS: tl.constexpr, QN: tl.constexpr,
                   QP: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Re-quantizes the kept weights of the rows not skipped with the table's (new) step."""
    k = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = k < num_unique
    cols = tl.arange(0, BLOCK_D)
    r = tl.load(uniq + k, mask=k_ok, other=0).to(tl.int64)
    go = k_ok & (tl.load(skipped + k, mask=k_ok, other=1) == 0) & (r >= 0) & (r < num_rows)
    w = tl.load(kept + k[:, None] * DIM + cols[None, :],
                mask=go[:, None] & (cols < DIM)[None, :], other=0.0)
    s = tl.zeros([BLOCK_R], tl.float32) + tl.load(table_step)
    _encode(rows, tl.where(go, r, 0) * stride, go, w, s, r, cols, DIM, seed_lo, seed_hi,
            counter_lo, row_offset, column_offset, BITS, QN, QP, STOCHASTIC, BLOCK_R, BLOCK_D)


def _f32(x: float) -> float:
    """x rounded to fp32 as the CPU kernel's static_cast<float> does (kernels take fp32)."""
    return float(reference._f32(x))


def lowp_update(rows, step, state, step_state, unique_rows, grad_rows, weights, weights_out,
                bits, dim, fmt, optimizer, lr, eps, weight_decay, beta1, beta2, iteration,
                learn_step, step_optimizer, step_lr, stochastic, seed, counter, row_offset=0,
                column_offset=0):
    """``torch.ops.qembed.lowp_update`` in Triton: in place; returns the number of rows skipped
    for a non-finite gradient (int64 scalar tensor on the table's device)."""
    uniq, grad = unique_rows.contiguous(), grad_rows.contiguous()
    check_update_args(rows, step, state, step_state, uniq, grad, weights, weights_out, bits, dim,
                      fmt, optimizer, iteration, learn_step, step_optimizer, row_offset,
                      column_offset)
    if validating(rows.device):
        check_update_rows_values(uniq, rows.shape[0])
    table = word_aligned(rows)
    skipped = _launch(table, step, state, step_state, uniq, grad, weights, weights_out, bits,
                      dim, fmt, optimizer, lr, eps, weight_decay, beta1, beta2, iteration,
                      learn_step, step_optimizer, step_lr, stochastic, seed, counter, row_offset,
                      column_offset)
    if table is not rows:
        rows.copy_(table)
    return skipped


def _launch(rows, step, state, step_state, uniq, grad, weights, weights_out, bits, dim, fmt,
            optimizer, lr, eps, weight_decay, beta1, beta2, iteration, learn_step,
            step_optimizer, step_lr, stochastic, seed, counter, row_offset,
            column_offset) -> torch.Tensor:
    """Runs the update in place; returns the skipped-row count."""
    u = uniq.numel()
    skipped = torch.zeros(u, dtype=torch.int32, device=rows.device)
    if u == 0:
        return skipped.sum()
    per_row = fmt == FORMATS["symmetric"]
    defer = learn_step and not per_row
    kept = weights_out
    if defer and kept is None:
        kept = torch.empty(u, dim, dtype=torch.float32, device=rows.device)
    lsq = torch.empty(u, dtype=torch.float32, device=rows.device) if defer else None
    b1, b2, omb1, omb2, bc1, bc2 = (float(c) for c in reference._adam_coeffs((beta1, beta2),
                                                                               iteration))
    adam = dict(b1=b1, b2=b2, omb1=omb1, omb2=omb2, bc1=bc1, bc2=bc2, eps=_f32(eps),
                step_lr=_f32(step_lr), STEP_ADAM=learn_step and step_optimizer == 1)
    key = dict(seed_lo=seed & 0xFFFFFFFF, seed_hi=(seed >> 32) & 0xFFFFFFFF,
               counter_lo=counter & 0xFFFFFFFF, row_offset=row_offset,
               column_offset=column_offset, BITS=bits, QN=qmin(bits), QP=qmax(bits),
               STOCHASTIC=stochastic)
    block_d = triton.next_power_of_2(padded_dim(dim))  # whole groups of 8 codes
    block_r = max(1, min(16, ELEMENTS_PER_PROGRAM // block_d))
    blocks = dict(BLOCK_R=block_r, BLOCK_D=block_d, enable_fp_fusion=False)
    grid = (triton.cdiv(u, block_r),)
    table_step = step if not per_row else None
    _update_kernel[grid](
        rows, rows.shape[1], rows.shape[0], table_step, state, step_state, uniq, u, grad,
        weights, kept, lsq, skipped, dim, _f32(lr), wd=_f32(weight_decay),
        row_gscale=float(reference._lsq_scale(qmax(bits), dim)),
        CODE_BYTES=code_bytes(dim, bits), PARAM_OFFSET=param_offset(dim, bits), PER_ROW=per_row,
        OPT=optimizer, LEARN=learn_step, DEFER=defer, HAS_WEIGHTS=weights is not None,
        KEEP=kept is not None, **adam, **key, **blocks)
    if defer:
        _table_step_kernel[(1,)](step, step_state, lsq, skipped, u, dim,
                                 QP1=max(qmax(bits), 1), num_warps=1, enable_fp_fusion=False,
                                 **adam)
        _encode_kernel[grid](rows, rows.shape[1], rows.shape[0], step, uniq, u, kept, skipped,
                             dim, **key, **blocks)
    return skipped.sum()

