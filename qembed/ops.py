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
import importlib
import importlib.util
import threading

import torch

from . import _checks, _extension, reference
from .formats import STEP_OPTIMIZERS, code_bytes, format_id, optimizer_id, pooling_id, row_bytes

# Loading the library registers the operators; None without a build.
_C = _extension.load()
HAS_EXTENSION = _C is not None

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


def cpu_capability() -> str | None:
    """The instruction set the CPU kernels run in: ``"avx512"``, ``"avx2"`` or ``"scalar"``
    (None without the extension). The best the CPU supports, chosen when qembed loads;
    the environment variable ``QEMBED_CPU_CAPABILITY`` set to a lower one forces it (for
    comparisons), and one the CPU cannot run fails the import. ``"avx512"`` needs AVX512F,
    BW, CD, DQ, VL and AVX512VBMI (Ice Lake, Zen 4 and later; a Skylake-X gets ``"avx2"``),
    ``"avx2"`` needs x86-64-v3 (AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE)."""
    return _C.cpu_capability() if HAS_EXTENSION else None


def cached_result_bytes() -> int:
    """Bytes held for reuse from freed CPU op results. A lookup's output or row gradients of
    1 MiB and more get memory of earlier results freed since (on huge pages where the system
    allows), so a training loop does not fault in tens of MB of fresh pages every step. Up to
    ``QEMBED_RESULT_CACHE_MB`` (default 512; 0 turns the reuse off) idle bytes are kept, the
    longest idle returned to the system first. 0 without the extension."""
    return _C.cached_result_bytes() if HAS_EXTENSION else 0


def empty_result_cache() -> int:
    """Returns the memory :func:`cached_result_bytes` counts to the system (as
    ``torch.cuda.empty_cache`` does for CUDA memory); the bytes released. Results still in
    use are untouched."""
    return _C.empty_result_cache() if HAS_EXTENSION else 0


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
        return _triton_op("embedding_bag")(*args)
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
                weights_out: torch.Tensor | None = None, row_offset: int = 0,
                column_offset: int = 0) -> torch.Tensor:
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

    ``row_offset`` and ``column_offset`` (a multiple of 8) place ``rows`` inside a larger
    table, as a shard of it: row r and element d are keyed as row ``row_offset + r`` and
    element ``column_offset + d``, so the shard rounds exactly as the whole table would.
    """
    triton = _triton(rows.device)
    if not triton and not _compiled():
        return reference.lowp_update(rows, step, state, step_state, unique_rows, grad_rows, bits,
                                     dim, fmt, optimizer, lr, eps, weight_decay, betas,
                                     iteration, learn_step, step_optimizer, step_lr, stochastic,
                                     seed, counter, weights, weights_out, row_offset,
                                     column_offset)
    args = (rows, step, state, step_state, unique_rows, grad_rows, weights, weights_out, bits,
            dim, format_id(fmt), optimizer_id(optimizer), lr, eps, weight_decay, betas[0],
            betas[1], iteration, learn_step, optimizer_id(step_optimizer, STEP_OPTIMIZERS),
            step_lr, stochastic, seed, counter, row_offset, column_offset)
    if triton:
        return _triton_op("lowp_update")(*args)
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


def _format_ids(formats) -> list[int]:
    return [format_id(f) for f in formats]


def _pooling_ids(poolings) -> list[int]:
    return [pooling_id(p) for p in poolings]


def embedding_bags(tables: list[torch.Tensor], steps: list[torch.Tensor], bits: list[int],
                   dims: list[int], formats: list, feature_tables: list[int],
                   feature_columns: list[int], poolings: list, values: torch.Tensor,
                   offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None,
                   output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every feature of a batch in one lookup, in TorchRec's KeyedJaggedTensor layout.

    ``tables[t]`` is a packed table of ``bits[t]``, ``dims[t]``, ``formats[t]`` (with
    ``steps[t]`` its [1] step for ``"symmetric_table"``, an empty tensor otherwise). Feature
    ``f`` reads ``tables[feature_tables[f]]`` and pools by ``poolings[f]`` (``"sum"`` or
    ``"mean"``); ``values`` [N] and ``offsets`` [F * B + 1] are key-major (bag b of feature f
    is ``values[offsets[f * B + b]:offsets[f * B + b + 1]]``). Returns [B, sum of the
    features' dims] with feature f's pooled rows at columns ``feature_columns[f]`` onwards.
    Differentiable in ``per_sample_weights``; the tables get no gradient (see
    :func:`embedding_bags_backward` and :func:`embedding_bags_update`)."""
    args = (list(tables), list(steps), [int(b) for b in bits], [int(d) for d in dims],
            _format_ids(formats), [int(t) for t in feature_tables],
            [int(c) for c in feature_columns], _pooling_ids(poolings), values, offsets,
            per_sample_weights, output_dtype)
    if not _compiled():
        return reference.embedding_bags(*args)
    return torch.ops.qembed.embedding_bags(*args)


def embedding_bags_backward(grad_out: torch.Tensor, dims: list[int], feature_tables: list[int],
                            feature_columns: list[int], poolings: list, values: torch.Tensor,
                            offsets: torch.Tensor,
                            per_sample_weights: torch.Tensor | None = None
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradient of :func:`embedding_bags` with respect to the rows it read, per table:
    ``(unique_rows[t] int64 ascending, grad_rows[t] fp32 [U_t, dims[t]])``. The features
    of a table are summed together, repeats in the order of ``values`` (deterministic)."""
    args = (grad_out, [int(d) for d in dims], [int(t) for t in feature_tables],
            [int(c) for c in feature_columns], _pooling_ids(poolings), values, offsets,
            per_sample_weights)
    if not _compiled():
        return reference.embedding_bags_backward(*args)
    rows, grads = torch.ops.qembed.embedding_bags_backward(*args)
    return list(rows), list(grads)


def embedding_bags_psw_backward(grad_out: torch.Tensor, tables: list[torch.Tensor],
                                steps: list[torch.Tensor], bits: list[int], dims: list[int],
                                formats: list, feature_tables: list[int],
                                feature_columns: list[int], values: torch.Tensor,
                                offsets: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`embedding_bags` (sum pooling) with respect to
    ``per_sample_weights``: fp32 [N]."""
    args = (grad_out, list(tables), list(steps), [int(b) for b in bits], [int(d) for d in dims],
            _format_ids(formats), [int(t) for t in feature_tables],
            [int(c) for c in feature_columns], values, offsets)
    if not _compiled():
        return reference.embedding_bags_psw_backward(*args)
    return torch.ops.qembed.embedding_bags_psw_backward(*args)


def embedding_bags_update(tables: list[torch.Tensor], steps: list[torch.Tensor],
                          states: list[torch.Tensor], step_states: list[torch.Tensor],
                          unique_rows: list[torch.Tensor], grad_rows: list[torch.Tensor],
                          bits: list[int], dims: list[int], formats: list,
                          optimizer: str = "adagrad", lr: float = 0.01, eps: float = 1e-8,
                          weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                          learn_step: bool = False, step_optimizer: str = "sgd",
                          step_lr: float = 0.0, stochastic: bool = True,
                          seeds: list[int] | None = None,
                          counters: list[int] | None = None,
                          row_offsets: list[int] | None = None,
                          column_offsets: list[int] | None = None) -> torch.Tensor:
    """:func:`lowp_update` for every table of a batch in one call, in place: table t's
    distinct rows ``unique_rows[t]`` (strictly increasing) with gradient ``grad_rows[t]``, at
    its own width, with its own ``states[t]``, ``step_states[t]`` and ``steps[t]`` (its [1]
    step for ``"symmetric_table"``, an empty tensor otherwise). ``counters[t]`` keys table
    t's stochastic rounding with ``seeds[t]`` and is its Adam iteration (from 1): each table
    gets the bits :func:`lowp_update` gives it with ``iteration = counter = counters[t]``
    and ``row_offsets[t]``, ``column_offsets[t]`` (0 when not given; see :func:`lowp_update`).
    Returns the rows skipped per table for a non-finite gradient (int64 [T])."""
    n = len(tables)
    seeds = [0] * n if seeds is None else [int(x) for x in seeds]
    counters = [1] * n if counters is None else [int(x) for x in counters]
    row_offsets = None if row_offsets is None else [int(x) for x in row_offsets]
    column_offsets = None if column_offsets is None else [int(x) for x in column_offsets]
    args = (list(tables), list(steps), list(states), list(step_states), list(unique_rows),
            list(grad_rows), [int(b) for b in bits], [int(d) for d in dims], _format_ids(formats),
            optimizer_id(optimizer), lr, eps, weight_decay, betas[0], betas[1], learn_step,
            optimizer_id(step_optimizer, STEP_OPTIMIZERS), step_lr, stochastic, seeds, counters,
            row_offsets, column_offsets)
    if not _compiled():
        return reference.embedding_bags_update(*args)
    return torch.ops.qembed.embedding_bags_update(*args)


def embedding_bags_backward_update(grad_out: torch.Tensor, feature_tables: list[int],
                                   feature_columns: list[int], poolings: list,
                                   values: torch.Tensor, offsets: torch.Tensor,
                                   per_sample_weights: torch.Tensor | None,
                                   tables: list[torch.Tensor], steps: list[torch.Tensor],
                                   states: list[torch.Tensor], step_states: list[torch.Tensor],
                                   bits: list[int], dims: list[int], formats: list,
                                   optimizer: str = "adagrad", lr: float = 0.01,
                                   eps: float = 1e-8, weight_decay: float = 0.0,
                                   betas: tuple[float, float] = (0.9, 0.999),
                                   learn_step: bool = False, step_optimizer: str = "sgd",
                                   step_lr: float = 0.0, stochastic: bool = True,
                                   seeds: list[int] | None = None,
                                   counters: list[int] | None = None,
                                   row_offsets: list[int] | None = None,
                                   column_offsets: list[int] | None = None) -> torch.Tensor:
    """:func:`embedding_bags_backward` then :func:`embedding_bags_update` on its result, in
    one call that never stores the row gradients: each distinct row's gradient is summed and
    applied at once (on the CPU; CUDA runs the two ops). The lookup's arguments and
    ``grad_out`` as the backward takes them, the tables and the update's options as the
    update takes them; every table gets the bits the two ops give it. Returns the rows
    skipped per table for a non-finite gradient (int64 [T])."""
    n = len(tables)
    seeds = [0] * n if seeds is None else [int(x) for x in seeds]
    counters = [1] * n if counters is None else [int(x) for x in counters]
    row_offsets = None if row_offsets is None else [int(x) for x in row_offsets]
    column_offsets = None if column_offsets is None else [int(x) for x in column_offsets]
    args = (grad_out, [int(t) for t in feature_tables], [int(c) for c in feature_columns],
            _pooling_ids(poolings), values, offsets, per_sample_weights, list(tables),
            list(steps), list(states), list(step_states), [int(b) for b in bits],
            [int(d) for d in dims], _format_ids(formats), optimizer_id(optimizer), lr, eps,
            weight_decay, betas[0], betas[1], learn_step,
            optimizer_id(step_optimizer, STEP_OPTIMIZERS), step_lr, stochastic, seeds, counters,
            row_offsets, column_offsets)
    if not _compiled():
        return reference.embedding_bags_backward_update(*args)
    return torch.ops.qembed.embedding_bags_backward_update(*args)


def table_zeros(*shape: int, dtype: torch.dtype = torch.uint8, device=None) -> torch.Tensor:
    """``torch.zeros`` for a table's storage. On CPU the memory is advised for transparent
    huge pages before it is first written (where the system allows it): random row reads
    across a large table then walk far fewer page tables. Values and layout are those of
    ``torch.zeros``."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and HAS_EXTENSION:
        torch.ops.qembed.advise_huge_pages(t)
    return t.zero_()


def _triton_op(op: str):
    """The Triton entry point of op (qembed/triton/<op>.py); triton is imported on the first
    call, not with qembed."""
    return getattr(importlib.import_module(f"qembed.triton.{op}"), op)


def _register_triton_cuda_kernels() -> None:
    """Triton as the CUDA kernel of the ops the extension has none for."""
    for op in TRITON_OPS:
        name = f"qembed::{op}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
            continue

        def kernel(*args, _op=op):
            return _triton_op(_op)(*args)

        torch.library.register_kernel(name, "cuda", kernel)


if HAS_EXTENSION and HAS_TRITON:
    _register_triton_cuda_kernels()

if HAS_EXTENSION:
    # The fakes check what the C++ kernels check before they read data (qembed._checks): they
    # also serve the Meta key, which the dispatcher picks when any argument is a meta tensor,
    # and then no C++ check runs.

    @torch.library.register_fake("qembed::pack")
    def _pack_fake(codes, bits):
        _checks.check_pack_args(codes, bits)
        return codes.new_empty(codes.shape[0], code_bytes(codes.shape[1], bits))

    @torch.library.register_fake("qembed::unpack")
    def _unpack_fake(packed, bits, dim):
        _checks.check_unpack_args(packed, bits, dim)
        return packed.new_empty(packed.shape[0], dim)

    @torch.library.register_fake("qembed::quantize")
    def _quantize_fake(weight, bits, fmt, step, stochastic, seed, counter):
        _checks.check_quantize_args(weight, bits, fmt, step)
        return weight.new_empty(weight.shape[0], row_bytes(weight.shape[1], bits, fmt),
                                dtype=torch.uint8)

    @torch.library.register_fake("qembed::dequantize")
    def _dequantize_fake(rows, bits, dim, fmt, step):
        _checks.check_rows(rows, dim, bits, fmt)
        _checks.check_table_step(step, fmt, rows)
        return rows.new_empty(rows.shape[0], dim, dtype=torch.float32)

    @torch.library.register_fake("qembed::embedding_bag")
    def _embedding_bag_fake(rows, indices, offsets, psw, step, bits, dim, fmt, mode,
                            include_last_offset, padding_idx, output_dtype):
        n = _checks.check_lookup_args(rows, indices, offsets, psw, step, bits, dim, fmt, mode,
                                      include_last_offset, output_dtype)
        return rows.new_empty(n, dim, dtype=output_dtype)

    @torch.library.register_fake("qembed::embedding_bag_backward")
    def _embedding_bag_backward_fake(grad_out, indices, offsets, psw, mode,
                                     include_last_offset, padding_idx):
        _checks.check_backward_args(grad_out, indices, offsets, psw, mode, include_last_offset)
        u = torch.library.get_ctx().new_dynamic_size()
        return (indices.new_empty(u, dtype=torch.long),
                grad_out.new_empty(u, grad_out.shape[1], dtype=torch.float32))

    @torch.library.register_fake("qembed::embedding_bag_psw_backward")
    def _embedding_bag_psw_backward_fake(grad_out, rows, indices, offsets, step, bits, dim, fmt,
                                         mode, include_last_offset, padding_idx):
        _checks.check_psw_backward_args(grad_out, rows, indices, offsets, step, bits, dim, fmt,
                                        mode, include_last_offset)
        return grad_out.new_empty(indices.shape[0], dtype=torch.float32)

    @torch.library.register_fake("qembed::lowp_update")
    def _lowp_update_fake(rows, step, state, step_state, unique_rows, grad_rows, weights,
                          weights_out, bits, dim, fmt, optimizer, lr, eps, weight_decay, beta1,
                          beta2, iteration, learn_step, step_optimizer, step_lr, stochastic, seed,
                          counter, row_offset=0, column_offset=0):
        _checks.check_update_args(rows, step, state, step_state, unique_rows,
                                  grad_rows.contiguous(), weights, weights_out, bits, dim, fmt,
                                  optimizer, iteration, learn_step, step_optimizer, row_offset,
                                  column_offset)
        return rows.new_empty((), dtype=torch.long)

    # embedding_bag's autograd is in C++ (csrc/autograd.cpp).

    @torch.library.register_fake("qembed::mpe_search_forward")
    def _mpe_search_forward_fake(weight, indices, offsets, row_group, probs, alpha, beta, bits,
                                 mode, include_last_offset):
        _checks.check_search_args("mpe_search_forward", weight, row_group, probs, alpha, beta,
                                  bits)
        n = _checks.check_search_lookup_args(weight, indices, offsets, mode, include_last_offset)
        return weight.new_empty(n, weight.shape[1])

    @torch.library.register_fake("qembed::mpe_search_backward")
    def _mpe_search_backward_fake(weight, unique_rows, grad_rows, row_group, probs, alpha, beta,
                                  bits, numel):
        _checks.check_search_args("mpe_search_backward", weight, row_group, probs, alpha, beta,
                                  bits)
        _checks.check_search_rows_args(weight, unique_rows, grad_rows, numel)
        return (grad_rows.new_empty(grad_rows.shape), alpha.new_empty(alpha.shape),
                beta.new_empty(beta.shape), probs.new_empty(probs.shape))

    @torch.library.register_fake("qembed::embedding_bags")
    def _embedding_bags_fake(tables, steps, bits, dims, formats, feature_tables, feature_columns,
                             poolings, values, offsets, psw, output_dtype):
        batch, width = _checks.check_bags_args(tables, steps, bits, dims, formats,
                                               feature_tables, feature_columns, poolings,
                                               values, offsets, psw, output_dtype)
        return values.new_empty(batch, width, dtype=output_dtype)

    @torch.library.register_fake("qembed::embedding_bags_backward")
    def _embedding_bags_backward_fake(grad_out, dims, feature_tables, feature_columns, poolings,
                                      values, offsets, psw):
        _checks.check_bags_backward_args(grad_out, dims, feature_tables, feature_columns,
                                         poolings, values, offsets, psw)
        ctx = torch.library.get_ctx()
        sizes = [ctx.new_dynamic_size() for _ in dims]
        return ([values.new_empty(u, dtype=torch.long) for u in sizes],
                [grad_out.new_empty(u, d, dtype=torch.float32) for u, d in zip(sizes, dims)])

    @torch.library.register_fake("qembed::embedding_bags_psw_backward")
    def _embedding_bags_psw_backward_fake(grad_out, tables, steps, bits, dims, formats,
                                          feature_tables, feature_columns, values, offsets):
        _checks.check_bags_psw_backward_args(grad_out, tables, steps, bits, dims, formats,
                                             feature_tables, feature_columns, values, offsets)
        return grad_out.new_empty(values.shape[0], dtype=torch.float32)

    @torch.library.register_fake("qembed::embedding_bags_update")
    def _embedding_bags_update_fake(tables, steps, states, step_states, unique_rows, grad_rows,
                                    bits, dims, formats, optimizer, lr, eps, weight_decay, beta1,
                                    beta2, learn_step, step_optimizer, step_lr, stochastic, seeds,
                                    counters, row_offsets=None, column_offsets=None):
        _checks.check_bags_update_args(tables, steps, states, step_states, unique_rows,
                                       [g.contiguous() for g in grad_rows], bits, dims, formats,
                                       optimizer, learn_step, step_optimizer, seeds, counters,
                                       row_offsets, column_offsets)
        return tables[0].new_empty(len(tables), dtype=torch.long)

    @torch.library.register_fake("qembed::embedding_bags_backward_update")
    def _embedding_bags_backward_update_fake(grad_out, feature_tables, feature_columns,
                                             poolings, values, offsets, psw, tables, steps,
                                             states, step_states, bits, dims, formats,
                                             optimizer, lr, eps, weight_decay, beta1, beta2,
                                             learn_step, step_optimizer, step_lr, stochastic,
                                             seeds, counters, row_offsets=None,
                                             column_offsets=None):
        _checks.check_bags_backward_update_args(
            grad_out, feature_tables, feature_columns, poolings, values, offsets, psw, tables,
            steps, states, step_states, bits, dims, formats, optimizer, learn_step,
            step_optimizer, seeds, counters, row_offsets, column_offsets)
        return tables[0].new_empty(len(tables), dtype=torch.long)

    # embedding_bags' tables get no gradient (training updates them in its own backward, see
    # qembed/torchrec); per_sample_weights do, through embedding_bags_psw_backward. In
    # Python: a collection's lookup is large enough that the autograd wrapper's cost is lost
    # in it.
    def _embedding_bags_setup_context(ctx, inputs, output):
        (tables, steps, bits, dims, formats, feature_tables, feature_columns, _, values, offsets,
         psw, _) = inputs
        ctx.num_tables = len(tables)
        ctx.args = (list(bits), list(dims), list(formats), list(feature_tables),
                    list(feature_columns))
        ctx.psw_dtype = None if psw is None else psw.dtype
        ctx.save_for_backward(values, offsets, *tables, *steps)

    def _embedding_bags_backward_autograd(ctx, grad):
        grad_psw = None
        if ctx.needs_input_grad[10]:
            values, offsets, *saved = ctx.saved_tensors
            tables, steps = saved[:ctx.num_tables], saved[ctx.num_tables:]
            bits, dims, formats, feature_tables, feature_columns = ctx.args
            grad_psw = torch.ops.qembed.embedding_bags_psw_backward(
                grad, tables, steps, bits, dims, formats, feature_tables, feature_columns,
                values, offsets).to(ctx.psw_dtype)
        no_grads = [None] * ctx.num_tables  # one per table and per step: the same structure
        return (no_grads, list(no_grads)) + (None,) * 8 + (grad_psw, None)

    torch.library.register_autograd("qembed::embedding_bags", _embedding_bags_backward_autograd,
                                    setup_context=_embedding_bags_setup_context)

    @torch.library.register_fake("qembed::advise_huge_pages")
    def _advise_huge_pages_fake(t):
        return None

    @torch.library.register_fake("qembed::mpe_embedding_bag")
    def _mpe_embedding_bag_fake(segments, bits, steps, beta, location, indices, offsets, psw,
                                mode, include_last_offset, output_dtype):
        n = _checks.check_mixed_lookup_args(segments, bits, steps, beta, location, indices,
                                            offsets, psw, mode, include_last_offset,
                                            output_dtype)
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
