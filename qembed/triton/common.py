"""What the Triton ops share: device functions that read and write packed codes and inline
fp32 parameters (csrc/layout.h), counter-based uniforms (csrc/philox.h), rounding
(csrc/rounding.h) and the kernels' left-to-right sums; and the launchers' host helpers.

Every function that must agree bit for bit with the CPU kernels avoids what Triton lowers
approximately on a GPU: ``/`` and ``sqrt`` become ``div_rn`` and ``sqrt_rn``, and kernels
launch with ``enable_fp_fusion=False`` (the CPU build uses ``-ffp-contract=off``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def validating(device: torch.device) -> bool:
    """Whether to check index and row values, which needs them on the host: always on CPU
    tensors; on a CUDA device (a synchronisation) only with ``QEMBED_CUDA_VALIDATE=1``, as
    the CUDA kernels do."""
    return device.type != "cuda" or os.environ.get("QEMBED_CUDA_VALIDATE") == "1"


def word_aligned(rows: torch.Tensor) -> torch.Tensor:
    """The kernels access parameters as fp32, so rows must start on a 4-byte boundary (a view
    can start anywhere in its storage): otherwise a copy."""
    rows = rows.contiguous()
    return rows if rows.data_ptr() % 4 == 0 else rows.clone()


@triton.jit
def load_codes(row_ptr, d, mask, BITS: tl.constexpr, CODE_BYTES: tl.constexpr):
    """Code d of each row (an unsigned int32): bits [d*BITS, d*BITS + BITS) of the row's code
    bytes read as a little-endian bit string. row_ptr: uint8 pointers to the rows' starts."""
    bit = d * BITS
    byte = bit >> 3
    v = tl.load(row_ptr + byte, mask=mask, other=0).to(tl.uint32)
    if 8 % BITS != 0:  # 3, 5, 6, 7 bits: a code can straddle two bytes
        nxt = tl.load(row_ptr + byte + 1, mask=mask & (byte + 1 < CODE_BYTES), other=0)
        v = v | (nxt.to(tl.uint32) << 8)
    return ((v >> (bit & 7).to(tl.uint32)) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def store_codes(row_ptr, codes, row_mask, DIM, BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Packs codes [BLOCK_R, BLOCK_D] into the rows at row_ptr [BLOCK_R]: each group of 8
    codes becomes one integer of BITS bytes, stored low byte first; the groups that hold
    columns 0..DIM-1 are stored (a last partial group with the codes given for its pad)."""
    groups = tl.reshape(codes.to(tl.int64), (BLOCK_R, BLOCK_D // 8, 8))
    slot = tl.arange(0, 8)
    packed = tl.sum(groups << (slot * BITS)[None, None, :], axis=2)  # disjoint bits: sum = or
    data = (packed[:, :, None] >> (slot * 8)[None, None, :]) & 0xFF
    g = tl.arange(0, BLOCK_D // 8)
    ptr = row_ptr[:, None, None] + (g * BITS)[None, :, None] + slot[None, None, :]
    mask = row_mask[:, None, None] & (g < (DIM + 7) // 8)[None, :, None] & \
        (slot < BITS)[None, None, :]
    tl.store(ptr, data.to(tl.uint8), mask=mask)


@triton.jit
def f32_at(ptr):
    """fp32 pointers to the parameters at uint8 pointers ptr (4-byte aligned: rows are)."""
    return ptr.to(tl.pointer_type(tl.float32))


@triton.jit
def philox_uniform(row, d, seed_lo, seed_hi, counter_lo):
    """The uniforms in [0, 1) of elements d of table rows `row` (int64, the shape of d): word
    d % 4 of the Philox4x32-10 block with counter (d / 4, row lo, row hi, counter lo) and key
    (seed lo, seed hi)."""
    c0 = (d // 4).to(tl.uint32)
    c1 = row.to(tl.uint32)
    c2 = (row >> 32).to(tl.uint32)
    c3 = tl.zeros_like(c0) + tl.cast(counter_lo, tl.uint32)
    k0 = tl.cast(seed_lo, tl.uint32)
    k1 = tl.cast(seed_hi, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 += 0x9E3779B9
        k1 += 0xBB67AE85
    j = d % 4
    x = tl.where(j == 0, c0, tl.where(j == 1, c1, tl.where(j == 2, c2, c3)))
    return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def rint(x):
    """Round half to even (nearbyint), portable to the interpreter: adding and removing 2^23
    rounds to an integer in fp32 arithmetic; |x| >= 2^23 already is one."""
    big = 8388608.0
    r = tl.where(x >= 0, (x + big) - big, (x - big) + big)
    return tl.where(tl.abs(x) < big, r, x)


@triton.jit
def _lanes_above(acc, lanes, shift: tl.constexpr):
    """acc [BLOCK_R, 16] moved down by `shift` lanes (lane j gets lane j + shift, the top
    lanes 0), each value isolated exactly by a masked sum."""
    pick = lanes[None, :, None] + shift == lanes[None, None, :]
    return tl.sum(tl.where(pick, acc[:, None, :], 0.0), axis=2)


@triton.jit
def lane_sum(x, cols, DIM, BLOCK_R: tl.constexpr):
    """Sum of x [BLOCK_R, BLOCK_D] over columns 0..DIM-1 per row in the CPU kernel's order
    (csrc/optim.h, kSumLanes): partial j adds columns j, j + 16, j + 32, ... from the left,
    then the upper half of the partials is added onto the lower, 16 -> 8 -> 4 -> 2 -> 1. The
    columns of each step are isolated exactly by masked sums; the additions are fp32's."""
    lanes = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_R, 16], tl.float32)
    for k in range(0, tl.cdiv(DIM, 16)):
        col = 16 * k + lanes
        pick = (cols[:, None, :] == col[None, :, None]) & (col < DIM)[None, :, None]
        acc += tl.sum(tl.where(pick, x[:, None, :], 0.0), axis=2)
    acc = acc + _lanes_above(acc, lanes, 8)
    acc = acc + _lanes_above(acc, lanes, 4)
    acc = acc + _lanes_above(acc, lanes, 2)
    acc = acc + _lanes_above(acc, lanes, 1)
    return tl.sum(tl.where(lanes[None, :] == 0, acc, 0.0), axis=1)
