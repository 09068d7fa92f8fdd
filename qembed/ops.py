"""Python entry points of qembed's operators.

Each function calls ``torch.ops.qembed.<op>`` (compiled kernels for the tensors' device)
or, when the extension is not built or :func:`use_reference` is active, the pure-PyTorch
twin in :mod:`qembed.reference`. Fake (meta) implementations let the ops trace under
``torch.compile(fullgraph=True)``.

``embedding_bag`` and ``lowp_update`` also have Triton kernels (:mod:`qembed.triton`), used
where the extension has no CUDA kernel for them:

* extension built without CUDA kernels for the op: the Triton function is registered as
  the op's CUDA kernel (when triton is installed), so CUDA tensors reach it through
  ``torch.ops.qembed`` like any kernel (autograd, fake tensors and ``torch.compile`` as usual);
* no extension at all: the wrappers below send CUDA tensors to Triton, other tensors to the
  reference;
* :func:`use_triton` sends both ops to Triton for any device, for testing. CPU tensors then
  run in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment before
  triton is first imported.

Any ``dim`` >= 1: padding lives in the ops, not in the modules. Every op takes a table's
true ``dim`` and returns exactly ``dim`` columns; packed rows hold whole groups of 8 codes
(:func:`qembed.formats.padded_dim`), the pad written as the code of zero and never read into
a result. The kernels work on the padded width (the compiled ones widen their fp32 inputs
and narrow their outputs where ``dim`` is not a multiple of 8, one copy each), while
training's per-row divisors (row-wise Adagrad's mean, LSQ's scale ``1/sqrt(Qp * n)``) and
Adam's moments ``[R, 2 * dim]`` count only the real columns.
"""
from __future__ import annotations

import contextlib
import importlib.util
import threading

import torch

from . import reference
from .formats import (
    STEP_OPTIMIZERS,
    check_bits_dim,
    code_bytes,
    format_id,
    optimizer_id,
    pooling_id,
    row_bytes,
)

try:
    from . import _C  # noqa: F401  (loading the library registers the operators)

    HAS_EXTENSION = True
except ImportError:  # pragma: no cover - exercised only without a build
    HAS_EXTENSION = False

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_OPS = ("embedding_bag", "lowp_update")

_state = threading.local()  # .backend: None (by device), "reference" or "triton"


@contextlib.contextmanager
def _forced(backend: str | None):
    previous = getattr(_state, "backend", None)
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = previous


def use_reference(enabled: bool = True):
    """Run the pure-PyTorch reference instead of the compiled kernels inside this block."""
    return _forced("reference" if enabled else None)


def use_triton(enabled: bool = True):
    """Run ``embedding_bag`` and ``lowp_update`` with the Triton kernels inside this block, on
    any device (CPU tensors need ``TRITON_INTERPRET=1``); the other ops run as usual."""
    return _forced("triton" if enabled else None)


def _compiled() -> bool:
    return HAS_EXTENSION and getattr(_state, "backend", None) != "reference"


def _triton(device: torch.device) -> bool:
    """Whether embedding_bag / lowp_update on `device` go to qembed.triton from here."""
    backend = getattr(_state, "backend", None)
    if backend is not None:
        return backend == "triton"
    return not HAS_EXTENSION and HAS_TRITON and device.type == "cuda"


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
    triton = _triton(rows.device)
    if not triton and not _compiled():
        return reference.embedding_bag(rows, indices, offsets, bits, dim, fmt, step,
                                       per_sample_weights, mode, include_last_offset,
                                       padding_idx, output_dtype)
    if offsets is None:
        offsets = indices.new_zeros(0)
    args = (rows, indices, offsets, per_sample_weights, step, bits, dim, format_id(fmt),
            pooling_id(mode), include_last_offset, -1 if padding_idx is None else padding_idx,
            output_dtype)
    if triton:
        from . import triton as kernels
        return kernels.embedding_bag(*args)
    return torch.ops.qembed.embedding_bag(*args)


def embedding_bag_backward(grad_out: torch.Tensor, indices: torch.Tensor,
                           offsets: torch.Tensor | None,
                           per_sample_weights: torch.Tensor | None = None, mode: str = "sum",
                           include_last_offset: bool = False, padding_idx: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of :func:`embedding_bag` with respect to the rows it read, one row per
    distinct index: ``(unique_rows int64 [U] ascending, grad_rows fp32 [U, D])``.

    Repeats are summed in batch order (deterministic, any thread count); per-sample weights
    and ``mean`` are applied; ``padding_idx`` never appears. No dense [R, D] gradient."""
    if not _compiled():
        return reference.embedding_bag_backward(grad_out, indices, offsets, per_sample_weights,
                                                mode, include_last_offset, padding_idx)
    if offsets is None:
        offsets = indices.new_zeros(0)
    return torch.ops.qembed.embedding_bag_backward(
        grad_out, indices, offsets, per_sample_weights, pooling_id(mode), include_last_offset,
        -1 if padding_idx is None else padding_idx)


def embedding_bag_psw_backward(grad_out: torch.Tensor, rows: torch.Tensor,
                               indices: torch.Tensor, offsets: torch.Tensor | None, bits: int,
                               dim: int, fmt: str = "affine", step: torch.Tensor | None = None,
                               mode: str = "sum", include_last_offset: bool = False,
                               padding_idx: int | None = None) -> torch.Tensor:
    """Gradient of :func:`embedding_bag` with respect to ``per_sample_weights``: fp32 [N]."""
    if not _compiled():
        return reference.embedding_bag_psw_backward(grad_out, rows, indices, offsets, bits, dim,
                                                    fmt, step, mode, include_last_offset,
                                                    padding_idx)
    if offsets is None:
        offsets = indices.new_zeros(0)
    return torch.ops.qembed.embedding_bag_psw_backward(
        grad_out, rows, indices, offsets, step, bits, dim, format_id(fmt), pooling_id(mode),
        include_last_offset, -1 if padding_idx is None else padding_idx)


def lowp_update(rows: torch.Tensor, step: torch.Tensor | None, state: torch.Tensor,
                step_state: torch.Tensor, unique_rows: torch.Tensor, grad_rows: torch.Tensor,
                bits: int, dim: int, fmt: str = "symmetric", optimizer: str = "adagrad",
                lr: float = 0.01, eps: float = 1e-8, weight_decay: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999), iteration: int = 1,
                learn_step: bool = False, step_optimizer: str = "sgd", step_lr: float = 0.0,
                stochastic: bool = True, seed: int = 0, counter: int = 0,
                weights: torch.Tensor | None = None,
                weights_out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused low-precision training step, in place, for the distinct rows ``unique_rows``
    (strictly increasing) of a symmetric table ``rows``.

    Each row is dequantized (or taken from ``weights`` [U, D]), updated in fp32 by
    ``optimizer`` (``"sgd"``, ``"adagrad"``: row-wise, ``state`` [R, 1]; ``"adam"``:
    ``state`` [R, 2D] = [m | v]; ``"none"``), written to ``weights_out`` if given, its step
    moved by the LSQ gradient when ``learn_step`` (``step_optimizer`` ``"sgd"`` or
    ``"adam"`` with ``step_state`` [R or 1, 2]), and re-quantized with stochastic rounding
    keyed by (seed, counter, row, element) or to nearest. ``step`` is the per-table step
    ([1], updated in place) of the ``symmetric_table`` format. Rows with a non-finite
    gradient are left untouched; returns their count (int64 scalar tensor).
    """
    triton = _triton(rows.device)
    if not triton and not _compiled():
        return reference.lowp_update(rows, step, state, step_state, unique_rows, grad_rows, bits,
                                     dim, fmt, optimizer, lr, eps, weight_decay, betas,
                                     iteration, learn_step, step_optimizer, step_lr, stochastic,
                                     seed, counter, weights, weights_out)
    args = (rows, step, state, step_state, unique_rows, grad_rows, weights, weights_out, bits,
            dim, format_id(fmt), optimizer_id(optimizer), lr, eps, weight_decay, betas[0],
            betas[1], iteration, learn_step, optimizer_id(step_optimizer, STEP_OPTIMIZERS),
            step_lr, stochastic, seed, counter)
    if triton:
        from . import triton as kernels
        return kernels.lowp_update(*args)
    return torch.ops.qembed.lowp_update(*args)


def mpe_search_forward(weight: torch.Tensor, indices: torch.Tensor,
                       offsets: torch.Tensor | None, row_group: torch.Tensor,
                       probs: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                       bits: list[int], mode: str = "mean",
                       include_last_offset: bool = False) -> torch.Tensor:
    """MPE search lookup on an fp32 table ``weight`` [R, D]: each looked-up row becomes
    ``sum_b probs[row_group[r], b] * Q_b(w_r)`` over the candidate widths ``bits``
    (LSQ+ with steps ``alpha`` [m] and offset ``beta`` [D]; 0 bits contribute nothing),
    pooled by ``mode``. Differentiable in weight (dense gradient), probs, alpha and beta."""
    if offsets is None and mode != "none":
        raise ValueError(f"qembed.mpe_search_forward: offsets is required with mode {mode!r}")
    bits = [int(b) for b in bits]
    if not _compiled():
        return reference.mpe_search_forward(weight, indices, offsets, row_group, probs, alpha,
                                            beta, bits, mode, include_last_offset)
    if offsets is None:
        offsets = indices.new_zeros(0)
    return torch.ops.qembed.mpe_search_forward(weight, indices, offsets, row_group, probs,
                                               alpha, beta, bits, pooling_id(mode),
                                               include_last_offset)


def mpe_search_backward(weight: torch.Tensor, unique_rows: torch.Tensor,
                        grad_rows: torch.Tensor, row_group: torch.Tensor, probs: torch.Tensor,
                        alpha: torch.Tensor, beta: torch.Tensor, bits: list[int], numel: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The search's gradients from one pass over the distinct rows ``unique_rows`` with row
    gradients ``grad_rows`` [U, D]: ``(grad of those rows [U, D], grad_alpha [m],
    grad_beta [D], grad_probs [G, m])``; ``numel`` (values looked up) sets LSQ's scale."""
    bits = [int(b) for b in bits]
    if not _compiled():
        return reference.mpe_search_backward(weight, unique_rows, grad_rows, row_group, probs,
                                             alpha, beta, bits, numel)
    return torch.ops.qembed.mpe_search_backward(weight, unique_rows, grad_rows, row_group,
                                                probs, alpha, beta, bits, numel)


def mpe_embedding_bag(segments: list[torch.Tensor], bits: list[int], steps: torch.Tensor,
                      beta: torch.Tensor, location: torch.Tensor, indices: torch.Tensor,
                      offsets: torch.Tensor | None,
                      per_sample_weights: torch.Tensor | None = None, mode: str = "mean",
                      include_last_offset: bool = False,
                      output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One fused lookup over a mixed-width table: ``segments[s]`` holds rows of ``bits[s]``
    bits (offset-binary codes, value ``steps[s] * q + beta``); ``location`` gives each row's
    position in the concatenated segments, -1 for a 0-bit row (reads as zeros): a row map
    (int16/int32 [R]) or row ranges (int32 [K + 1, 2], see :func:`qembed.reference.row_map`),
    which cost 8 bytes per run of equal width instead of a map entry per row."""
    if offsets is None and mode != "none":
        raise ValueError(f"qembed.mpe_embedding_bag: offsets is required with mode {mode!r}")
    bits = [int(b) for b in bits]
    if not _compiled():
        return reference.mpe_embedding_bag(list(segments), bits, steps, beta, location, indices,
                                           offsets, per_sample_weights, mode,
                                           include_last_offset, output_dtype)
    if offsets is None:
        offsets = indices.new_zeros(0)
    return torch.ops.qembed.mpe_embedding_bag(list(segments), bits, steps, beta, location,
                                              indices, offsets, per_sample_weights,
                                              pooling_id(mode), include_last_offset,
                                              output_dtype)


def table_zeros(*shape: int, dtype: torch.dtype = torch.uint8, device=None) -> torch.Tensor:
    """``torch.zeros`` for a table's storage. On CPU the memory is advised for transparent
    huge pages before it is first written (where the system allows it): random row reads
    across a large table then walk far fewer page tables. Values and layout are those of
    ``torch.zeros``."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and HAS_EXTENSION:
        torch.ops.qembed.advise_huge_pages(t)
    return t.zero_()


def _check_same_device(base: torch.Tensor, base_name: str, **tensors) -> None:
    # The fake implementations below also serve the Meta key, which the dispatcher picks
    # when any argument is a meta tensor: the C++ device checks never run then.
    for name, t in tensors.items():
        if t is not None and t.device != base.device:
            raise ValueError(f"qembed: {name} is on {t.device} but {base_name} is on {base.device}")


def _register_triton_cuda_kernels() -> None:
    """Triton as the CUDA kernel of the ops the extension has none for; triton is imported
    on the first call, not with qembed."""
    for op in TRITON_OPS:
        name = f"qembed::{op}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
            continue

        def kernel(*args, _op=op):
            from . import triton as kernels
            return getattr(kernels, _op)(*args)

        torch.library.register_kernel(name, "cuda", kernel)


if HAS_EXTENSION and HAS_TRITON:
    _register_triton_cuda_kernels()

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

    @torch.library.register_fake("qembed::embedding_bag_backward")
    def _embedding_bag_backward_fake(grad_out, indices, offsets, psw, mode,
                                     include_last_offset, padding_idx):
        u = torch.library.get_ctx().new_dynamic_size()
        return (indices.new_empty(u, dtype=torch.long),
                grad_out.new_empty(u, grad_out.shape[1], dtype=torch.float32))

    @torch.library.register_fake("qembed::embedding_bag_psw_backward")
    def _embedding_bag_psw_backward_fake(grad_out, rows, indices, offsets, step, bits, dim, fmt,
                                         mode, include_last_offset, padding_idx):
        return grad_out.new_empty(indices.shape[0], dtype=torch.float32)

    @torch.library.register_fake("qembed::lowp_update")
    def _lowp_update_fake(rows, step, state, step_state, unique_rows, grad_rows, weights,
                          weights_out, *args):
        return rows.new_empty((), dtype=torch.long)

    # embedding_bag's autograd is in C++ (csrc/autograd.cpp).

    @torch.library.register_fake("qembed::mpe_search_forward")
    def _mpe_search_forward_fake(weight, indices, offsets, row_group, probs, alpha, beta, bits,
                                 mode, include_last_offset):
        _check_same_device(weight, "weight", indices=indices, row_group=row_group, probs=probs,
                           alpha=alpha, beta=beta)
        n = indices.shape[0] if mode == 2 else offsets.shape[0] - (1 if include_last_offset else 0)
        return weight.new_empty(n, weight.shape[1])

    @torch.library.register_fake("qembed::mpe_search_backward")
    def _mpe_search_backward_fake(weight, unique_rows, grad_rows, row_group, probs, alpha, beta,
                                  bits, numel):
        return (grad_rows.new_empty(grad_rows.shape), alpha.new_empty(alpha.shape),
                beta.new_empty(beta.shape), probs.new_empty(probs.shape))

    @torch.library.register_fake("qembed::advise_huge_pages")
    def _advise_huge_pages_fake(t):
        return None

    @torch.library.register_fake("qembed::mpe_embedding_bag")
    def _mpe_embedding_bag_fake(segments, bits, steps, beta, location, indices, offsets, psw,
                                mode, include_last_offset, output_dtype):
        _check_same_device(beta, "beta", steps=steps, location=location, indices=indices,
                           per_sample_weights=psw)
        n = indices.shape[0] if mode == 2 else offsets.shape[0] - (1 if include_last_offset else 0)
        return beta.new_empty(n, beta.shape[0], dtype=output_dtype)

    # The search's backward: the rows' gradients (repeats summed, mean applied) come from
    # embedding_bag_backward, then one pass over the distinct rows gives every gradient. The
    # table's gradient is dense [R, D]: the search trains an fp32 table with a dense optimizer.
    def _mpe_search_setup_context(ctx, inputs, output):
        weight, indices, offsets, row_group, probs, alpha, beta, bits, mode, include_last = inputs
        ctx.save_for_backward(weight, indices, offsets, row_group, probs, alpha, beta)
        ctx.args = (list(bits), mode, include_last)

    def _mpe_search_backward_autograd(ctx, grad):
        weight, indices, offsets, row_group, probs, alpha, beta = ctx.saved_tensors
        bits, mode, include_last = ctx.args
        rows, grad_rows = torch.ops.qembed.embedding_bag_backward(grad, indices, offsets, None,
                                                                  mode, include_last, -1)
        numel = max(indices.shape[0] * weight.shape[1], 1)
        grad_w_rows, grad_alpha, grad_beta, grad_probs = torch.ops.qembed.mpe_search_backward(
            weight, rows, grad_rows, row_group, probs, alpha, beta, bits, numel)
        grad_w = torch.zeros_like(weight).index_copy_(0, rows, grad_w_rows)
        return (grad_w, None, None, None, grad_probs, grad_alpha, grad_beta, None, None, None)

    torch.library.register_autograd("qembed::mpe_search_forward", _mpe_search_backward_autograd,
                                    setup_context=_mpe_search_setup_context)
