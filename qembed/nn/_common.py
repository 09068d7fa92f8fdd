"""What the embedding modules share: ``nn.EmbeddingBag``'s input conventions, padding_idx,
step calibration, and the lookup whose backward updates packed tables."""
from __future__ import annotations

import torch

from ..formats import qmax


def normalize_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx {padding_idx} is out of range for {num_embeddings} rows")
    return padding_idx % num_embeddings


def default_seed() -> int:
    """A seed drawn from torch's default CPU generator: without an explicit seed a module
    follows ``torch.manual_seed`` as torch's own modules do."""
    return int(torch.randint(0, 2**62, ()))


CHUNK_BYTES = 1 << 20  # fp32 bytes of rows quantized at a time when a table is built


def row_chunks(num_rows: int, dim: int):
    """(start, end) of consecutive blocks of rows holding about CHUNK_BYTES of fp32 each:
    tables are built block by block, so no fp32 [R, D] tensor is ever made."""
    step = max(1, CHUNK_BYTES // (4 * max(dim, 1)))
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


def bag_inputs(input: torch.Tensor, offsets: torch.Tensor | None,
               per_sample_weights: torch.Tensor | None, include_last_offset: bool):
    """``nn.EmbeddingBag``'s input conventions -> flat (indices, offsets, per_sample_weights):
    a 2-D input is fixed-length bags without offsets, a 1-D input needs offsets."""
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D (fixed-length bags)")
        bags, length = input.shape
        offsets = torch.arange(0, bags * length, length, device=input.device, dtype=input.dtype)
        if include_last_offset:
            offsets = torch.cat([offsets, offsets.new_tensor([bags * length])])
        input = input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets is required when input is 1-D")
    else:
        raise ValueError(f"input must be 1-D (with offsets) or 2-D, got {input.dim()}-D")
    return input, offsets, per_sample_weights


def symmetric_steps(weight: torch.Tensor, bits: int, per_row: bool) -> torch.Tensor:
    """Max-abs calibration of a symmetric step: the largest magnitude maps to Qp."""
    peak = weight.abs().amax(1) if per_row else weight.abs().amax().reshape(1)
    step = peak / max(qmax(bits), 1)
    return torch.where(step > 0, step, torch.ones_like(step)).to(torch.float32)


class TrainableLookup(torch.autograd.Function):
    """Lookup whose backward updates the tables it read. Inputs: an empty tensor that
    requires grad (so autograd reaches this node), the per-sample weights (which get a
    gradient), the module that owns the tables, the indices, offsets and the module's other
    lookup arguments. The module provides ``_lookup(indices, offsets, psw, *args)``,
    ``_psw_backward(grad_out, indices, offsets, *args)`` and ``_backward(grad_out, indices,
    offsets, psw, *args)``, which updates the tables."""

    @staticmethod
    def forward(ctx, anchor, psw, owner, indices, offsets, *args):
        ctx.owner, ctx.args = owner, args
        ctx.save_for_backward(indices, offsets, psw)
        return owner._lookup(indices, offsets, psw, *args)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        indices, offsets, psw = ctx.saved_tensors
        grad_psw = None
        if ctx.needs_input_grad[1]:  # before the update: it needs the rows the forward read
            grad_psw = ctx.owner._psw_backward(grad_out, indices, offsets,
                                               *ctx.args).to(psw.dtype)
        ctx.owner._backward(grad_out, indices, offsets, psw, *ctx.args)
        return (None, grad_psw, None, None, None) + (None,) * len(ctx.args)
