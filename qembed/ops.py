"""Python entry points of qembed's operators.

Each function calls ``torch.ops.qembed.<op>`` (compiled kernels for the tensors' device)
or, when the extension is not built or :func:`use_reference` is active, the pure-PyTorch
twin in :mod:`qembed.reference`. Fake (meta) implementations let the ops trace under
``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from . import reference
from .formats import check_bits_dim, code_bytes, format_id, pooling_id, row_bytes

try:
    from . import _C  # noqa: F401  (loading the library registers the operators)

    HAS_EXTENSION = True
except ImportError:  # pragma: no cover - exercised only without a build
    HAS_EXTENSION = False

_state = threading.local()


@contextlib.contextmanager
def use_reference(enabled: bool = True):
    """Run the pure-PyTorch reference instead of the compiled kernels inside this block."""
    previous = getattr(_state, "reference", False)
    _state.reference = enabled
    try:
        yield
    finally:
        _state.reference = previous


def _compiled() -> bool:
    return HAS_EXTENSION and not getattr(_state, "reference", False)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, D] (each < 2^bits) -> bit-packed uint8 [N, D*bits/8]."""
    if _compiled():
        return torch.ops.qembed.pack(codes, bits)
    return reference.pack(codes, bits)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Bit-packed uint8 [N, >= dim*bits/8] -> uint8 codes [N, dim]."""
    if _compiled():
        return torch.ops.qembed.unpack(packed, bits, dim)
    return reference.unpack(packed, bits, dim)


def quantize(weight: torch.Tensor, bits: int, fmt: str = "affine",
             step: torch.Tensor | None = None, stochastic: bool = False, seed: int = 0,
             counter: int = 0) -> torch.Tensor:
    """fp32 rows [N, D] -> packed rows [N, row_bytes] (see :mod:`qembed.formats`).

    ``step`` ([N] or [1] fp32) is required by the symmetric formats. ``stochastic`` rounds
    with the counter-based generator keyed by (seed, counter, row, element).
    """
    if _compiled():
        return torch.ops.qembed.quantize(weight, bits, format_id(fmt), step, stochastic, seed,
                                         counter)
    return reference.quantize(weight, bits, fmt, step, stochastic, seed, counter)


def dequantize(rows: torch.Tensor, bits: int, dim: int, fmt: str = "affine",
               step: torch.Tensor | None = None) -> torch.Tensor:
    """Packed rows -> fp32 [N, dim]."""
    if _compiled():
        return torch.ops.qembed.dequantize(rows, bits, dim, format_id(fmt), step)
    return reference.dequantize(rows, bits, dim, fmt, step)


def embedding_bag(rows: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None,
                  bits: int, dim: int, fmt: str = "affine", step: torch.Tensor | None = None,
                  per_sample_weights: torch.Tensor | None = None, mode: str = "sum",
                  include_last_offset: bool = False, padding_idx: int | None = None,
                  output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fused gather-dequantize-pool: ``out[b] = pool_{i in bag b} psw_i * row[indices[i]]``.

    ``mode`` is ``"sum"``, ``"mean"`` or ``"none"`` (one output row per index, as
    ``nn.Embedding``). Bags follow ``nn.EmbeddingBag``'s ``offsets`` and
    ``include_last_offset``; entries equal to ``padding_idx`` are skipped (and not counted
    by ``mean``); empty bags give zeros.
    """
    if offsets is None and mode != "none":
        raise ValueError(f"qembed.embedding_bag: offsets is required with mode {mode!r}")
    if not _compiled():
        return reference.embedding_bag(rows, indices, offsets, bits, dim, fmt, step,
                                       per_sample_weights, mode, include_last_offset,
                                       padding_idx, output_dtype)
    if offsets is None:
        offsets = indices.new_zeros(0)
    return torch.ops.qembed.embedding_bag(
        rows, indices, offsets, per_sample_weights, step, bits, dim, format_id(fmt),
        pooling_id(mode), include_last_offset, -1 if padding_idx is None else padding_idx,
        output_dtype)


def _check_same_device(base: torch.Tensor, base_name: str, **tensors) -> None:
    # The fake implementations below also serve the Meta key, which the dispatcher picks
    # when any argument is a meta tensor: the C++ device checks never run then.
    for name, t in tensors.items():
        if t is not None and t.device != base.device:
            raise ValueError(f"qembed: {name} is on {t.device} but {base_name} is on {base.device}")


if HAS_EXTENSION:

    @torch.library.register_fake("qembed::pack")
    def _pack_fake(codes, bits):
        check_bits_dim(bits, codes.shape[1])
        return codes.new_empty(codes.shape[0], code_bytes(codes.shape[1], bits))

    @torch.library.register_fake("qembed::unpack")
    def _unpack_fake(packed, bits, dim):
        check_bits_dim(bits, dim)
        return packed.new_empty(packed.shape[0], dim)

    @torch.library.register_fake("qembed::quantize")
    def _quantize_fake(weight, bits, fmt, step, stochastic, seed, counter):
        check_bits_dim(bits, weight.shape[1])
        _check_same_device(weight, "weight", step=step)
        return weight.new_empty(weight.shape[0], row_bytes(weight.shape[1], bits, fmt),
                                dtype=torch.uint8)

    @torch.library.register_fake("qembed::dequantize")
    def _dequantize_fake(rows, bits, dim, fmt, step):
        check_bits_dim(bits, dim)
        _check_same_device(rows, "rows", step=step)
        return rows.new_empty(rows.shape[0], dim, dtype=torch.float32)

    @torch.library.register_fake("qembed::embedding_bag")
    def _embedding_bag_fake(rows, indices, offsets, psw, step, bits, dim, fmt, mode,
                            include_last_offset, padding_idx, output_dtype):
        check_bits_dim(bits, dim)
        _check_same_device(rows, "rows", step=step)
        _check_same_device(rows, "the table", indices=indices, per_sample_weights=psw,
                           offsets=offsets if mode != 2 else None)
        if mode == 2:
            n = indices.shape[0]
        else:
            n = offsets.shape[0] - (1 if include_last_offset else 0)
        return rows.new_empty(n, dim, dtype=output_dtype)
