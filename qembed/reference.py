"""Pure-PyTorch version of every qembed op: the oracle for tests and the fallback when the
compiled extension is absent. Arithmetic follows the kernels operation by operation, so
deterministic results agree bit for bit and pooled sums up to float reordering."""
from __future__ import annotations

import torch

from .formats import (
    FORMATS,
    check_bits_dim,
    code_bytes,
    format_id,
    param_offset,
    pooling_id,
    qmin,
    row_bytes,
)

AFFINE, SYM_ROW, SYM_TABLE = FORMATS["affine"], FORMATS["symmetric"], FORMATS["symmetric_table"]
_MASK32 = 0xFFFFFFFF


# --- bit packing ------------------------------------------------------------------------

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, D] -> uint8 [N, D*bits/8]: 8 codes per `bits` bytes, low bits first."""
    n, dim = codes.shape
    check_bits_dim(bits, dim)
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"qembed.pack: code {int(codes.max())} does not fit in {bits} bits")
    shifts = torch.arange(bits, device=codes.device)
    stream = (codes.long().view(n, dim // 8, 8, 1) >> shifts) & 1  # bit k of code i
    stream = stream.reshape(n, dim // 8, bits, 8)  # bit j of byte m is stream bit 8m+j
    byte = (stream << torch.arange(8, device=codes.device)).sum(-1)
    return byte.reshape(n, code_bytes(dim, bits)).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """uint8 [N, >= D*bits/8] -> uint8 codes [N, D]."""
    check_bits_dim(bits, dim)
    n = packed.shape[0]
    data = packed[:, : code_bytes(dim, bits)].long().view(n, dim // 8, bits, 1)
    stream = (data >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(n, dim // 8, 8, bits)
    codes = (stream << torch.arange(bits, device=packed.device)).sum(-1)
    return codes.reshape(n, dim).to(torch.uint8)


# --- counter-based random numbers (csrc/philox.h) ---------------------------------------

def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a * m for a, m < 2^32 in int64 without overflow: split m into 16-bit halves.
    t_lo = a * (m & 0xFFFF)
    t_hi = a * (m >> 16)
    mid = t_lo + ((t_hi & 0xFFFF) << 16)
    return (t_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(c: list[torch.Tensor], k0: int, k1: int) -> list[torch.Tensor]:
    for _ in range(10):
        hi0, lo0 = _mulhilo(c[0], 0xD2511F53)
        hi1, lo1 = _mulhilo(c[2], 0xCD9E8D57)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c


def sr_uniforms(seed: int, counter: int, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Uniforms in [0, 1) [len(rows), dim] of stochastic rounding, keyed by
    (seed, counter, row, element) exactly as the kernels draw them."""
    rows = rows.long().view(-1, 1)
    quad = torch.arange(dim // 4, device=rows.device).view(1, -1)
    zeros = torch.zeros_like(rows * quad)
    c = [quad + zeros, (rows & _MASK32) + zeros, ((rows >> 32) & _MASK32) + zeros,
         zeros + (counter & _MASK32)]
    words = philox4x32_10(c, seed & _MASK32, (seed >> 32) & _MASK32)
    x = torch.stack(words, dim=-1).reshape(rows.shape[0], dim)
    return (x >> 8).to(torch.float32) * (1.0 / 16777216.0)


def round_codes(x: torch.Tensor, u: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """floor(x + u) (stochastic) or round-half-even (u None), clamped to [lo, hi]."""
    r = torch.floor(x + u) if u is not None else torch.round(x)
    return r.clamp(lo, hi)


# --- quantize / dequantize --------------------------------------------------------------

def _params_bytes(*cols: torch.Tensor) -> torch.Tensor:
    return torch.stack(cols, dim=1).to(torch.float32).contiguous().view(torch.uint8)


def quantize(weight: torch.Tensor, bits: int, fmt: str | int = "affine",
             step: torch.Tensor | None = None, stochastic: bool = False, seed: int = 0,
             counter: int = 0) -> torch.Tensor:
    """fp32 [N, D] -> packed rows [N, row_bytes] with parameters inline."""
    fmt = format_id(fmt)
    n, dim = weight.shape
    check_bits_dim(bits, dim)
    if not torch.isfinite(weight).all():
        raise ValueError("qembed.quantize: weight has a non-finite value")
    mask = (1 << bits) - 1
    if fmt == AFFINE:
        lo = weight.amin(1) if n else weight.new_zeros(0)
        hi = weight.amax(1) if n else weight.new_zeros(0)
        scale = (hi - lo) / float(mask)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        bias, offset = lo, 0
    else:
        if step is None:
            raise ValueError("qembed.quantize: symmetric formats need a step")
        if not (torch.isfinite(step).all() and (step > 0).all()):
            raise ValueError("qembed.quantize: steps must be positive and finite")
        scale = step.to(torch.float32).reshape(-1).expand(n)
        bias, offset = torch.zeros_like(scale), qmin(bits)
    x = (weight - bias[:, None]) / scale[:, None]
    u = sr_uniforms(seed, counter, torch.arange(n, device=weight.device), dim) if stochastic else None
    codes = (round_codes(x, u, offset, offset + mask) - offset).to(torch.uint8)
    out = torch.zeros(n, row_bytes(dim, bits, fmt), dtype=torch.uint8, device=weight.device)
    out[:, : code_bytes(dim, bits)] = pack(codes, bits)
    po = param_offset(dim, bits)
    if fmt == AFFINE:
        out[:, po:] = _params_bytes(scale, bias)
    elif fmt == SYM_ROW:
        out[:, po:] = _params_bytes(scale)
    return out


def row_params(rows: torch.Tensor, bits: int, dim: int, fmt: str | int,
               step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(scale [N], bias [N], code offset) such that value = scale * (code + offset) + bias."""
    fmt = format_id(fmt)
    n, po = rows.shape[0], param_offset(dim, bits)
    if fmt == AFFINE:
        p = rows[:, po: po + 8].contiguous().view(torch.float32)
        return p[:, 0], p[:, 1], 0
    if fmt == SYM_ROW:
        scale = rows[:, po: po + 4].contiguous().view(torch.float32)[:, 0]
    else:
        scale = step.to(torch.float32).reshape(1).expand(n)
    return scale, torch.zeros_like(scale), qmin(bits)


def dequantize(rows: torch.Tensor, bits: int, dim: int, fmt: str | int = "affine",
               step: torch.Tensor | None = None) -> torch.Tensor:
    """Packed rows -> fp32 [N, dim]."""
    fmt = format_id(fmt)
    check_bits_dim(bits, dim)
    if rows.dim() != 2 or rows.shape[1] != row_bytes(dim, bits, fmt):
        raise ValueError(f"qembed: packed rows of shape {tuple(rows.shape)} do not match "
                         f"dim={dim}, bits={bits}, format={fmt}")
    scale, bias, offset = row_params(rows, bits, dim, fmt, step)
    q = (unpack(rows, bits, dim).to(torch.int32) + offset).to(torch.float32)
    return scale[:, None] * q + bias[:, None]


# --- fused lookup -----------------------------------------------------------------------

def bag_lengths(offsets: torch.Tensor, num_indices: int, include_last_offset: bool) -> torch.Tensor:
    """Length of each bag; checks offsets as the kernels do."""
    off = offsets.long()
    if off.numel():
        if int(off[0]) != 0:
            raise ValueError(f"qembed.embedding_bag: offsets[0] must be 0, got {int(off[0])}")
        if (off[1:] < off[:-1]).any():
            raise ValueError("qembed.embedding_bag: offsets must be non-decreasing")
        if int(off[-1]) > num_indices:
            raise ValueError(f"qembed.embedding_bag: offsets[-1] = {int(off[-1])} is past the "
                             f"end of indices ({num_indices})")
    if include_last_offset:
        if not off.numel():
            raise ValueError("qembed: with include_last_offset, offsets needs at least one element")
        ends = off[1:]
    else:
        ends = torch.cat([off[1:], off.new_tensor([num_indices])])
    return ends - off[: ends.numel()]


def embedding_bag(rows: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None,
                  bits: int, dim: int, fmt: str | int = "affine",
                  step: torch.Tensor | None = None,
                  per_sample_weights: torch.Tensor | None = None, mode: str = "sum",
                  include_last_offset: bool = False, padding_idx: int | None = None,
                  output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[b] = pool over i in bag b of psw_i * dequantize(rows[indices[i]])."""
    pooling_id(mode)
    if per_sample_weights is not None and mode == "mean":
        raise ValueError("qembed: per_sample_weights are only supported with mode 'sum' or 'none'")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= rows.shape[0]):
        raise IndexError(f"qembed.embedding_bag: an index is out of range for a table of "
                         f"{rows.shape[0]} rows")
    values = dequantize(rows[indices.long()], bits, dim, fmt, step)
    if per_sample_weights is not None:
        values = values * per_sample_weights.to(torch.float32)[:, None]
    keep = (indices != (-1 if padding_idx is None else padding_idx)).to(torch.float32)
    values = values * keep[:, None]
    if mode == "none":
        return values.to(output_dtype)
    lengths = bag_lengths(offsets, indices.numel(), include_last_offset)
    bag_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths)
    used = bag_of.numel()
    out = values.new_zeros(lengths.numel(), dim).index_add_(0, bag_of, values[:used])
    if mode == "mean":
        count = values.new_zeros(lengths.numel()).index_add_(0, bag_of, keep[:used])
        out = out / count.clamp(min=1)[:, None]
    return out.to(output_dtype)
