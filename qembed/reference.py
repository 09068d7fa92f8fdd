"""Pure-PyTorch version of every qembed op: the oracle for tests and the fallback when the
compiled extension is absent. Arithmetic follows the kernels operation by operation, so
deterministic results agree bit for bit and pooled sums up to float reordering. Arguments are
checked as the kernels check them (:mod:`qembed._checks`), with the same exceptions."""
from __future__ import annotations

import torch

from . import _checks
from .formats import (
    FORMATS,
    OPTIMIZERS,
    POOLINGS,
    STEP_OPTIMIZERS,
    code_bytes,
    format_id,
    optimizer_id,
    padded_dim,
    param_offset,
    pooling_id,
    qmax,
    qmin,
    row_bytes,
)

AFFINE, SYM_ROW, SYM_TABLE = FORMATS["affine"], FORMATS["symmetric"], FORMATS["symmetric_table"]
_MASK32 = 0xFFFFFFFF


# --- bit packing ------------------------------------------------------------------------

def _pad_columns(x: torch.Tensor) -> torch.Tensor:
    """x [N, D] -> [N, padded_dim(D)], the new columns zero."""
    return torch.nn.functional.pad(x, (0, padded_dim(x.shape[1]) - x.shape[1]))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, D] -> uint8 [N, code_bytes(D, bits)]: 8 codes per `bits` bytes, low
    bits first; a last partial group padded with code 0."""
    _checks.check_pack_args(codes, bits)
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"qembed.pack: code {int(codes.max())} does not fit in {bits} bits")
    codes = _pad_columns(codes)
    n, dim = codes.shape
    shifts = torch.arange(bits, device=codes.device)
    stream = (codes.long().view(n, dim // 8, 8, 1) >> shifts) & 1  # bit k of code i
    stream = stream.reshape(n, dim // 8, bits, 8)  # bit j of byte m is stream bit 8m+j
    byte = (stream << torch.arange(8, device=codes.device)).sum(-1)
    return byte.reshape(n, code_bytes(dim, bits)).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """uint8 [N, >= code_bytes(D, bits)] -> uint8 codes [N, D]."""
    _checks.check_unpack_args(packed, bits, dim)
    n, groups = packed.shape[0], padded_dim(dim) // 8
    data = packed[:, : code_bytes(dim, bits)].long().view(n, groups, bits, 1)
    stream = (data >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(n, groups, 8, bits)
    codes = (stream << torch.arange(bits, device=packed.device)).sum(-1)
    return codes.reshape(n, groups * 8)[:, :dim].to(torch.uint8)


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


def sr_uniforms(seed: int, counter: int, rows: torch.Tensor, dim: int,
                column_offset: int = 0) -> torch.Tensor:
    """Uniforms in [0, 1) [len(rows), dim] of stochastic rounding, keyed by
    (seed, counter, row, element) exactly as the kernels draw them; the elements are
    ``column_offset`` (a multiple of 4) onwards."""
    rows = rows.long().view(-1, 1)
    quads = (dim + 3) // 4
    quad = torch.arange(quads, device=rows.device).view(1, -1) + column_offset // 4
    zeros = torch.zeros_like(rows * quad)
    c = [quad + zeros, (rows & _MASK32) + zeros, ((rows >> 32) & _MASK32) + zeros,
         zeros + (counter & _MASK32)]
    words = philox4x32_10(c, seed & _MASK32, (seed >> 32) & _MASK32)
    x = torch.stack(words, dim=-1).reshape(rows.shape[0], 4 * quads)[:, :dim]
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
    _checks.check_quantize_args(weight, bits, fmt, step)
    n, dim = weight.shape
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
        if not (torch.isfinite(step).all() and (step > 0).all()):
            raise ValueError("qembed.quantize: steps must be positive and finite")
        scale = step.to(torch.float32).reshape(-1).expand(n)
        bias, offset = torch.zeros_like(scale), qmin(bits)
    x = _pad_columns((weight - bias[:, None]) / scale[:, None])  # the pad: x = 0
    u = sr_uniforms(seed, counter, torch.arange(n, device=weight.device), x.shape[1]) \
        if stochastic else None
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
    _checks.check_rows(rows, dim, bits, fmt)
    _checks.check_table_step(step, fmt, rows)
    scale, bias, offset = row_params(rows, bits, dim, fmt, step)
    q = (unpack(rows, bits, dim).to(torch.int32) + offset).to(torch.float32)
    return scale[:, None] * q + bias[:, None]


# --- fused lookup -----------------------------------------------------------------------

def bag_lengths(offsets: torch.Tensor, num_indices: int, include_last_offset: bool) -> torch.Tensor:
    """Length of each bag; checks the offsets' values as the kernels do."""
    _checks.check_offsets_values(offsets, num_indices)
    off = offsets.long()
    if include_last_offset:
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
    _checks.check_lookup_args(rows, indices, offsets, per_sample_weights, step, bits, dim,
                              format_id(fmt), pooling_id(mode), include_last_offset, output_dtype)
    _checks.check_indices_values(indices, rows.shape[0])
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


# --- training: backward and fused update -------------------------------------------------

def _seq_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim strictly left to right, the order of the kernels' loops."""
    acc = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for d in range(x.shape[-1]):
        acc = acc + x[..., d]
    return acc


SUM_LANES = 16  # csrc/optim.h's kSumLanes


def _lane_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in the update kernels' order (csrc/optim.h, kSumLanes): 16
    partial sums, partial j adding elements j, j + 16, j + 32, ... from the left, then the
    upper half of the partials added onto the lower, 16 -> 8 -> 4 -> 2 -> 1. Padding with
    zeros changes nothing: the partials start at +0 and never hold -0."""
    n = x.shape[-1]
    groups = (n + SUM_LANES - 1) // SUM_LANES  # not -1 in the reshape: x may have no rows
    x = torch.nn.functional.pad(x, (0, -n % SUM_LANES)).reshape(*x.shape[:-1], groups, SUM_LANES)
    acc = torch.zeros(x.shape[:-2] + (SUM_LANES,), dtype=x.dtype, device=x.device)
    for k in range(x.shape[-2]):
        acc = acc + x[..., k, :]
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc[..., 0]


def _bag_of(indices: torch.Tensor, offsets: torch.Tensor | None, mode: str,
            include_last_offset: bool) -> torch.Tensor:
    """The bag of each position that belongs to one (positions past the last bag do not)."""
    if mode == "none":
        return torch.arange(indices.numel(), device=indices.device)
    lengths = bag_lengths(offsets, indices.numel(), include_last_offset)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=indices.device), lengths)


def embedding_bag_backward(grad_out: torch.Tensor, indices: torch.Tensor,
                           offsets: torch.Tensor | None,
                           per_sample_weights: torch.Tensor | None = None, mode: str = "sum",
                           include_last_offset: bool = False,
                           padding_idx: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique_rows [U] ascending, grad_rows fp32 [U, D]): the gradient of embedding_bag with
    respect to each distinct row it read, repeats summed in batch order."""
    _checks.check_backward_args(grad_out, indices, offsets, per_sample_weights, pooling_id(mode),
                                include_last_offset)
    grad_out = grad_out.to(torch.float32)
    device = grad_out.device
    bag = _bag_of(indices, offsets, mode, include_last_offset)
    idx = indices[: bag.numel()].long()
    pad = -1 if padding_idx is None else padding_idx
    if per_sample_weights is not None:
        factor = per_sample_weights[: bag.numel()].to(torch.float32)
    elif mode == "mean":
        count = torch.zeros(grad_out.shape[0], dtype=torch.long, device=device)
        count.index_add_(0, bag, (idx != pad).long())
        factor = (1.0 / count.clamp(min=1).to(torch.float32))[bag]
    else:
        factor = torch.ones(bag.numel(), device=device)
    return _sum_by_row(idx, grad_out[bag] * factor[:, None], pad)


def _sum_by_row(idx: torch.Tensor, contrib: torch.Tensor, skip: int = -1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct rows ascending, the sum of each one's contributions [U, D] in position
    order), leaving out the row `skip`."""
    keys, perm = torch.sort(idx, stable=True)
    keep = keys != skip
    keys, perm = keys[keep], perm[keep]
    unique_rows, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    grad_rows = torch.zeros(unique_rows.numel(), contrib.shape[1], device=contrib.device)
    for k in range(int(counts.max()) if counts.numel() else 0):
        sel = counts > k
        grad_rows[sel] = grad_rows[sel] + contrib[perm[starts[sel] + k]]
    return unique_rows, grad_rows


def embedding_bag_psw_backward(grad_out: torch.Tensor, rows: torch.Tensor,
                               indices: torch.Tensor, offsets: torch.Tensor | None, bits: int,
                               dim: int, fmt: str | int = "affine",
                               step: torch.Tensor | None = None, mode: str = "sum",
                               include_last_offset: bool = False,
                               padding_idx: int | None = None) -> torch.Tensor:
    """d out / d per_sample_weights: <grad_out[bag(i)], row[indices[i]]>, 0 for padding."""
    _checks.check_psw_backward_args(grad_out, rows, indices, offsets, step, bits, dim,
                                    format_id(fmt), pooling_id(mode), include_last_offset)
    _checks.check_indices_values(indices, rows.shape[0])
    bag = _bag_of(indices, offsets, mode, include_last_offset)
    idx = indices[: bag.numel()].long()
    values = dequantize(rows[idx], bits, dim, fmt, step)
    dot = _seq_sum(grad_out.to(torch.float32)[bag] * values)
    out = torch.zeros(indices.numel(), device=grad_out.device)
    out[: bag.numel()] = torch.where(idx != (-1 if padding_idx is None else padding_idx), dot, 0.0)
    return out


MIN_STEP = 1e-10  # csrc/cpu/lowp_update.cpp: steps stay at or above this


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    # torch's vectorized fp32 sqrt is not always correctly rounded; the kernels' is. Going
    # through fp64 gives the correctly rounded fp32 result.
    return torch.sqrt(x.double()).to(torch.float32)


def _lsq_scale(qp: int, n: int) -> torch.Tensor:
    return 1.0 / _sqrt(_f32(float(max(qp, 1) * n)))


def _adam_coeffs(betas: tuple[float, float], iteration: int):
    b1, b2 = _f32(betas[0]), _f32(betas[1])
    bc1 = _f32(1.0 - float(b1) ** iteration)
    bc2 = _f32(1.0 - float(b2) ** iteration)
    return b1, b2, 1 - b1, 1 - b2, bc1, bc2


def lowp_update(rows: torch.Tensor, step: torch.Tensor | None, state: torch.Tensor,
                step_state: torch.Tensor, unique_rows: torch.Tensor, grad_rows: torch.Tensor,
                bits: int, dim: int, fmt: str | int = "symmetric", optimizer: str = "adagrad",
                lr: float = 0.01, eps: float = 1e-8, weight_decay: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999), iteration: int = 1,
                learn_step: bool = False, step_optimizer: str = "sgd", step_lr: float = 0.0,
                stochastic: bool = True, seed: int = 0, counter: int = 0,
                weights: torch.Tensor | None = None,
                weights_out: torch.Tensor | None = None, row_offset: int = 0,
                column_offset: int = 0) -> torch.Tensor:
    """In place: the fused low-precision training step of csrc/cpu/lowp_update.cpp for the
    distinct rows `unique_rows`; returns the number of rows skipped (non-finite gradient).
    Stochastic rounding keys row r and element d as row_offset + r, column_offset + d."""
    fmt, opt = format_id(fmt), optimizer_id(optimizer)
    sopt = optimizer_id(step_optimizer, STEP_OPTIMIZERS)
    _checks.check_update_args(rows, step, state, step_state, unique_rows,
                              grad_rows.contiguous(), weights, weights_out, bits, dim, fmt, opt,
                              iteration, learn_step, sopt, row_offset, column_offset)
    _checks.check_update_rows_values(unique_rows, rows.shape[0])
    uniq, g = unique_rows.long(), grad_rows.to(torch.float32)
    ok = torch.isfinite(g).all(1)
    if weights is not None:
        ok &= torch.isfinite(weights).all(1)
    if weights_out is not None:
        weights_out[~ok] = float("nan")
    r, g = uniq[ok], g[ok]
    qn, qp = qmin(bits), qmax(bits)
    s = row_params(rows[r], bits, dim, fmt, step)[0].clone()
    w = weights[ok].clone() if weights is not None else dequantize(rows[r], bits, dim, fmt, step)
    lr_, eps_, wd = _f32(lr), _f32(eps), _f32(weight_decay)
    b1, b2, omb1, omb2, bc1, bc2 = _adam_coeffs(betas, iteration)

    gd = g + wd * w
    if opt == OPTIMIZERS["sgd"]:
        w = w - lr_ * gd
    elif opt == OPTIMIZERS["adagrad"]:
        acc = state[r, 0] + _lane_sum(gd * gd) / _f32(float(dim))
        state[r, 0] = acc
        w = w - lr_ * (gd / (_sqrt(acc) + eps_)[:, None])
    elif opt == OPTIMIZERS["adam"]:
        m = b1 * state[r, :dim] + omb1 * gd
        v = b2 * state[r, dim:] + omb2 * (gd * gd)
        state[r] = torch.cat([m, v], 1)
        w = w - lr_ * ((m / bc1) / (_sqrt(v / bc2) + eps_))
    if weights_out is not None:
        weights_out[ok] = w

    def next_step(s, gs, st):
        delta = gs
        if sopt == STEP_OPTIMIZERS["adam"]:
            m = b1 * st[:, 0] + omb1 * gs
            v = b2 * st[:, 1] + omb2 * (gs * gs)
            st[:, 0], st[:, 1] = m, v
            delta = (m / bc1) / (_sqrt(v / bc2) + eps_)
        return torch.maximum(s - _f32(step_lr) * delta, _f32(MIN_STEP))

    if learn_step and r.numel():
        x = w / s[:, None]
        dq = torch.where(x < qn, _f32(qn), torch.where(x > qp, _f32(qp), torch.round(x) - x))
        gs = _lane_sum(g * dq)
        if fmt == SYM_ROW:
            st = step_state[r] if sopt else None
            s = next_step(s, _lsq_scale(qp, dim) * gs, st)
            if sopt:
                step_state[r] = st
        else:
            st = step_state[:1] if sopt else None
            new = next_step(step.reshape(1), _lsq_scale(qp, r.numel() * dim) * _seq_sum(gs), st)
            step.copy_(new.reshape(step.shape))
            s = new.expand(r.numel())
    x = _pad_columns(w / s[:, None])  # the pad: x = 0
    u = sr_uniforms(seed, counter, r + row_offset, x.shape[1], column_offset) \
        if stochastic else None
    codes = (round_codes(x, u, qn, qp) - qn).to(torch.uint8)
    rows[r, : code_bytes(dim, bits)] = pack(codes, bits)
    if fmt == SYM_ROW:
        po = param_offset(dim, bits)
        rows[r, po: po + 4] = _params_bytes(s)
    return (~ok).sum()


# --- many tables in one call (TorchRec's KeyedJaggedTensor layout) ------------------------

def _feature_slice(offsets: torch.Tensor, f: int, batch: int):
    """(first position, last position + 1, the feature's offsets from 0 [B + 1])."""
    part = offsets.long()[f * batch: (f + 1) * batch + 1]
    return int(part[0]), int(part[-1]), part - part[0]


def _table_step(steps, formats, t):
    return steps[t] if format_id(formats[t]) == SYM_TABLE else None


def _pooling_name(pooling: int) -> str:
    return next(k for k, v in POOLINGS.items() if v == pooling)


def embedding_bags(tables: list[torch.Tensor], steps: list[torch.Tensor], bits: list[int],
                   dims: list[int], formats: list, feature_tables: list[int],
                   feature_columns: list[int], poolings: list, values: torch.Tensor,
                   offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None,
                   output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each feature looked up by embedding_bag on its table, written at its columns."""
    op = "qembed.embedding_bags: "
    poolings = [pooling_id(p) for p in poolings]
    batch, width = _checks.check_bags_args(
        tables, steps, bits, dims, [format_id(f) for f in formats], feature_tables,
        feature_columns, poolings, values, offsets, per_sample_weights, output_dtype)
    _checks.check_bags_offsets_values(op, offsets, max(batch, 1), values.numel())
    _checks.check_bags_ids_values(op, values, offsets, batch, feature_tables,
                                  [t.shape[0] for t in tables])
    out = torch.zeros(batch, width, device=values.device)
    for f, (t, pooling) in enumerate(zip(feature_tables, poolings)):
        start, end, local = _feature_slice(offsets, f, batch)
        psw = None if per_sample_weights is None else per_sample_weights[start:end]
        col = feature_columns[f]
        out[:, col: col + dims[t]] = embedding_bag(
            tables[t], values[start:end], local, bits[t], dims[t], formats[t],
            _table_step(steps, formats, t), psw, _pooling_name(pooling), include_last_offset=True)
    return out.to(output_dtype)


def embedding_bags_backward(grad_out: torch.Tensor, dims: list[int], feature_tables: list[int],
                            feature_columns: list[int], poolings: list, values: torch.Tensor,
                            offsets: torch.Tensor,
                            per_sample_weights: torch.Tensor | None = None
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per table: (distinct rows ascending, their gradients), the contributions of all the
    table's features summed in the order of values."""
    poolings = [pooling_id(p) for p in poolings]
    batch, _ = _checks.check_bags_backward_args(grad_out, dims, feature_tables, feature_columns,
                                                poolings, values, offsets, per_sample_weights)
    _checks.check_bags_offsets_values("qembed.embedding_bags_backward: ", offsets, max(batch, 1),
                                      values.numel())
    grad_out = grad_out.to(torch.float32)
    device = grad_out.device
    rows, grads = [], []
    for t, dim in enumerate(dims):
        idx = [values.new_zeros(0, dtype=torch.long)]
        contrib = [torch.zeros(0, dim, device=device)]
        for f, ft in enumerate(feature_tables):
            if ft != t:
                continue
            start, end, local = _feature_slice(offsets, f, batch)
            lengths = local[1:] - local[:-1]
            bag = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
            if per_sample_weights is not None:
                factor = per_sample_weights[start:end].to(torch.float32)
            elif poolings[f] == POOLINGS["mean"]:
                factor = (1.0 / lengths.clamp(min=1).to(torch.float32))[bag]
            else:
                factor = torch.ones(end - start, device=device)
            col = feature_columns[f]
            idx.append(values[start:end].long())
            contrib.append(grad_out[bag, col: col + dim] * factor[:, None])
        r, g = _sum_by_row(torch.cat(idx), torch.cat(contrib))
        rows.append(r)
        grads.append(g)
    return rows, grads


def embedding_bags_psw_backward(grad_out: torch.Tensor, tables: list[torch.Tensor],
                                steps: list[torch.Tensor], bits: list[int], dims: list[int],
                                formats: list, feature_tables: list[int],
                                feature_columns: list[int], values: torch.Tensor,
                                offsets: torch.Tensor) -> torch.Tensor:
    """embedding_bag_psw_backward of each feature on its table and columns."""
    op = "qembed.embedding_bags_psw_backward: "
    batch, _ = _checks.check_bags_psw_backward_args(
        grad_out, tables, steps, bits, dims, [format_id(f) for f in formats], feature_tables,
        feature_columns, values, offsets)
    _checks.check_bags_offsets_values(op, offsets, max(batch, 1), values.numel())
    _checks.check_bags_ids_values(op, values, offsets, batch, feature_tables,
                                  [t.shape[0] for t in tables])
    out = torch.zeros(values.numel(), device=grad_out.device)
    for f, t in enumerate(feature_tables):
        start, end, local = _feature_slice(offsets, f, batch)
        col = feature_columns[f]
        out[start:end] = embedding_bag_psw_backward(
            grad_out[:, col: col + dims[t]], tables[t], values[start:end], local, bits[t],
            dims[t], formats[t], _table_step(steps, formats, t), "sum", include_last_offset=True)
    return out


def embedding_bags_update(tables: list[torch.Tensor], steps: list[torch.Tensor],
                          states: list[torch.Tensor], step_states: list[torch.Tensor],
                          unique_rows: list[torch.Tensor], grad_rows: list[torch.Tensor],
                          bits: list[int], dims: list[int], formats: list,
                          optimizer: str | int = "adagrad", lr: float = 0.01, eps: float = 1e-8,
                          weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999,
                          learn_step: bool = False, step_optimizer: str | int = "sgd",
                          step_lr: float = 0.0, stochastic: bool = True,
                          seeds: list[int] | None = None,
                          counters: list[int] | None = None,
                          row_offsets: list[int] | None = None,
                          column_offsets: list[int] | None = None) -> torch.Tensor:
    """lowp_update on each table with iteration = counter = counters[t], seed seeds[t] and
    key offsets row_offsets[t], column_offsets[t] (0 when not given)."""
    opt, sopt = optimizer_id(optimizer), optimizer_id(step_optimizer, STEP_OPTIMIZERS)
    n = len(tables)
    seeds = [0] * n if seeds is None else seeds
    counters = [1] * n if counters is None else counters
    row_offsets = [0] * n if row_offsets is None else row_offsets
    column_offsets = [0] * n if column_offsets is None else column_offsets
    fmts = [format_id(f) for f in formats]
    _checks.check_bags_update_args(tables, steps, states, step_states, unique_rows,
                                   [g.contiguous() for g in grad_rows], bits, dims, fmts, opt,
                                   learn_step, sopt, seeds, counters, row_offsets, column_offsets)
    for t in range(n):
        _checks.check_bags_update_rows_values(unique_rows[t], tables[t].shape[0], t)
    skipped = [lowp_update(tables[t], _table_step(steps, fmts, t), states[t], step_states[t],
                           unique_rows[t], grad_rows[t], bits[t], dims[t], fmts[t], opt, lr,
                           eps, weight_decay, (beta1, beta2), counters[t], learn_step, sopt,
                           step_lr, stochastic, seeds[t], counters[t], row_offset=row_offsets[t],
                           column_offset=column_offsets[t])
               for t in range(n)]
    return torch.stack([s.reshape(()) for s in skipped]).long()


def embedding_bags_backward_update(grad_out: torch.Tensor, feature_tables: list[int],
                                   feature_columns: list[int], poolings: list,
                                   values: torch.Tensor, offsets: torch.Tensor,
                                   per_sample_weights: torch.Tensor | None,
                                   tables: list[torch.Tensor], steps: list[torch.Tensor],
                                   states: list[torch.Tensor], step_states: list[torch.Tensor],
                                   bits: list[int], dims: list[int], formats: list,
                                   optimizer: str | int = "adagrad", lr: float = 0.01,
                                   eps: float = 1e-8, weight_decay: float = 0.0,
                                   beta1: float = 0.9, beta2: float = 0.999,
                                   learn_step: bool = False, step_optimizer: str | int = "sgd",
                                   step_lr: float = 0.0, stochastic: bool = True,
                                   seeds: list[int] | None = None,
                                   counters: list[int] | None = None,
                                   row_offsets: list[int] | None = None,
                                   column_offsets: list[int] | None = None) -> torch.Tensor:
    """embedding_bags_backward, then embedding_bags_update on its rows and gradients."""
    op = "qembed.embedding_bags_backward_update: "
    opt, sopt = optimizer_id(optimizer), optimizer_id(step_optimizer, STEP_OPTIMIZERS)
    n = len(tables)
    seeds = [0] * n if seeds is None else seeds
    counters = [1] * n if counters is None else counters
    fmts = [format_id(f) for f in formats]
    pools = [pooling_id(p) for p in poolings]
    batch, _ = _checks.check_bags_backward_update_args(
        grad_out, feature_tables, feature_columns, pools, values, offsets, per_sample_weights,
        tables, steps, states, step_states, bits, dims, fmts, opt, learn_step, sopt, seeds,
        counters, row_offsets, column_offsets)
    _checks.check_bags_offsets_values(op, offsets, max(batch, 1), values.numel())
    _checks.check_bags_ids_values(op, values, offsets, batch, feature_tables,
                                  [t.shape[0] for t in tables])
    rows, grads = embedding_bags_backward(grad_out, dims, feature_tables, feature_columns, pools,
                                          values, offsets, per_sample_weights)
    return embedding_bags_update(tables, steps, states, step_states, rows, grads, bits, dims,
                                 fmts, opt, lr, eps, weight_decay, beta1, beta2, learn_step,
                                 sopt, step_lr, stochastic, seeds, counters, row_offsets,
                                 column_offsets)


# --- mixed-precision embeddings (MPE) -----------------------------------------------------

class _GradScale(torch.autograd.Function):
    """Identity whose gradient is multiplied by `scale` (LSQ's gradient scaling)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def lsq_scale(bits: int, numel: int) -> float:
    """LSQ's gradient scale 1 / sqrt(Qp * numel); Qp = 0 at one bit counts as 1."""
    return float(_lsq_scale(qmax(bits) if bits > 1 else 1, numel))


def lsq_plus(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, bits: int,
             grad_scale: float = 1.0) -> torch.Tensor:
    """Q_b(w) = alpha * clamp(round((w - beta) / alpha), Qn, Qp) + beta (zeros for 0 bits),
    differentiable as a straight-through fake quantizer: round passes gradients, the clamp
    stops them outside [Qn, Qp]; alpha's and beta's gradients are scaled by `grad_scale`."""
    if bits == 0:
        return torch.zeros_like(w)
    a, c = _GradScale.apply(alpha, grad_scale), _GradScale.apply(beta, grad_scale)
    x = ((w - c) / a).clamp(qmin(bits), qmax(bits))
    return a * (x + (torch.round(x) - x).detach()) + c


def _pool(values: torch.Tensor, offsets: torch.Tensor | None, mode: str,
          include_last_offset: bool) -> torch.Tensor:
    """Sum or mean of per-index rows [N, D] over the bags of `offsets`; `none` passes them."""
    if mode == "none":
        return values
    lengths = bag_lengths(offsets, values.shape[0], include_last_offset)
    bag_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    out = values.new_zeros(lengths.numel(), values.shape[1]).index_add(
        0, bag_of, values[: bag_of.numel()])
    return out / lengths.clamp(min=1)[:, None].to(values.dtype) if mode == "mean" else out


def mpe_search_forward(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None,
                       row_group: torch.Tensor, probs: torch.Tensor, alpha: torch.Tensor,
                       beta: torch.Tensor, bits: list[int], mode: str = "mean",
                       include_last_offset: bool = False) -> torch.Tensor:
    """Pooled sum_b probs[g(r), b] * Q_b(w_r) over the looked-up rows; differentiable in
    weight, probs, alpha and beta with the gradients mpe_search_backward computes."""
    _checks.check_search_args("mpe_search_forward", weight, row_group, probs, alpha, beta, bits)
    _checks.check_search_lookup_args(weight, indices, offsets, pooling_id(mode),
                                     include_last_offset)
    _checks.check_indices_values(indices, weight.shape[0])
    rows = indices.long()
    w, p = weight[rows], probs[row_group[rows]]
    numel = max(rows.numel() * weight.shape[1], 1)
    acc = torch.zeros_like(w)
    for k, b in enumerate(bits):
        if b:
            acc = acc + p[:, k: k + 1] * lsq_plus(w, alpha[k], beta, b, lsq_scale(b, numel))
    return _pool(acc, offsets, mode, include_last_offset)


def mpe_search_backward(weight: torch.Tensor, unique_rows: torch.Tensor,
                        grad_rows: torch.Tensor, row_group: torch.Tensor, probs: torch.Tensor,
                        alpha: torch.Tensor, beta: torch.Tensor, bits: list[int], numel: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of the rows unique_rows [U, D], grad_alpha [m], grad_beta [D], grad_probs [G, m])
    of the search, from the rows' gradients grad_rows [U, D], in closed form."""
    _checks.check_search_args("mpe_search_backward", weight, row_group, probs, alpha, beta, bits)
    _checks.check_search_rows_args(weight, unique_rows, grad_rows, numel)
    _checks.check_indices_values(unique_rows, weight.shape[0])
    rows = unique_rows.long()
    w, g, groups = weight[rows], grad_rows.to(torch.float32), row_group[rows]
    p = probs[groups]
    grad_w = torch.zeros_like(g)
    grad_alpha, grad_beta = torch.zeros_like(alpha), torch.zeros_like(beta)
    grad_probs = torch.zeros_like(probs)
    for k, b in enumerate(bits):
        if not b:
            continue
        qn, qp = qmin(b), qmax(b)
        x = (w - beta) / alpha[k]
        inside = (x >= qn) & (x <= qp)
        pg = p[:, k: k + 1] * g
        grad_w = grad_w + torch.where(inside, pg, 0.0)
        dq = torch.where(inside, torch.round(x) - x, torch.where(x < qn, float(qn), float(qp)))
        scale = lsq_scale(b, numel)
        grad_alpha[k] = scale * (pg * dq).sum()
        grad_beta = grad_beta + scale * torch.where(inside, 0.0, pg).sum(0)
        value = alpha[k] * torch.round(x).clamp(qn, qp) + beta
        grad_probs[:, k].index_add_(0, groups, (g * value).sum(1))
    return grad_w, grad_alpha, grad_beta, grad_probs


def row_map(location: torch.Tensor) -> torch.Tensor:
    """A mixed-width table's row locations as a map (int64 [R]: each row's position in the
    concatenated segments, -1 if pruned). ``location`` is a map already, or row ranges
    (int32 [K + 1, 2]: range k holds rows ``[location[k, 0], location[k + 1, 0])`` at
    consecutive positions from ``location[k, 1]``, or pruned if that is -1)."""
    if location.dim() == 1:
        return location.long()
    first, pos = location[:, 0].long(), location[:-1, 1].long()
    lengths = first[1:] - first[:-1]
    start = torch.repeat_interleave(pos, lengths)
    within = torch.arange(int(first[-1]), device=location.device) - \
        torch.repeat_interleave(first[:-1], lengths)
    return torch.where(start < 0, -1, start + within)


def mpe_embedding_bag(segments: list[torch.Tensor], bits: list[int], steps: torch.Tensor,
                      beta: torch.Tensor, location: torch.Tensor, indices: torch.Tensor,
                      offsets: torch.Tensor | None,
                      per_sample_weights: torch.Tensor | None = None, mode: str = "mean",
                      include_last_offset: bool = False,
                      output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Lookup over a mixed-width table: each segment dequantized on its own (steps[s] * q +
    beta), pruned rows (location -1) zero, then pooled. ``location`` is a row map [R] or
    row ranges [K + 1, 2] (see :func:`row_map`)."""
    _checks.check_mixed_lookup_args(segments, bits, steps, beta, location, indices, offsets,
                                    per_sample_weights, pooling_id(mode), include_last_offset,
                                    output_dtype)
    location = row_map(location)
    _checks.check_indices_values(indices, location.numel())
    dim = beta.numel()
    values = [steps[s] * (unpack(seg, b, dim).to(torch.int32) + qmin(b)).to(torch.float32)
              + beta for s, (seg, b) in enumerate(zip(segments, bits))]
    table = torch.cat([beta.new_zeros(1, dim)] + values)  # row 0: the pruned rows' zeros
    out = table[location.long()[indices.long()] + 1]
    if per_sample_weights is not None:
        out = out * per_sample_weights.to(torch.float32)[:, None]
    return _pool(out, offsets, mode, include_last_offset).to(output_dtype)
