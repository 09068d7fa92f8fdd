"""The ops' argument checks for the code that runs in Python: the fake (meta) implementations,
the Triton launchers and the reference. Each function is the twin of the one of the same name
in csrc/checks.h and raises the same exception with the same message (dtypes named as c10
names them), before any kernel reads memory. Formats, poolings and optimizers are the ops'
integer ids (:mod:`qembed.formats`).

The ``check_*_values`` functions check what the C++ kernels check while they read the data
(index ranges, offsets, row order); they need the values on the host.
"""
from __future__ import annotations

import torch

from .formats import FORMATS, OPTIMIZERS, POOLINGS, STEP_OPTIMIZERS, code_bytes, row_bytes

SYM_ROW, SYM_TABLE, AFFINE = FORMATS["symmetric"], FORMATS["symmetric_table"], FORMATS["affine"]
POOL_SUM, POOL_MEAN, POOL_NONE = POOLINGS["sum"], POOLINGS["mean"], POOLINGS["none"]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
              torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
              torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}


def fail(exc: type[Exception], *parts) -> None:
    raise exc("".join(str(p) for p in parts))


def dtype_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype))


def _sizes(t: torch.Tensor) -> list:
    return list(t.shape)  # printed as c10 prints sizes: [2, 3]


def state_width(optimizer: int, dim: int) -> int:
    """Columns of lowp_update's optimizer state per row (csrc/optim.h)."""
    return {OPTIMIZERS["adagrad"]: 1, OPTIMIZERS["adam"]: 2 * dim}.get(optimizer, 0)


def check_bits_dim(bits: int, dim: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        fail(ValueError, "qembed: bits must be in 1..8, got ", bits)
    if dim <= 0:
        fail(ValueError, "qembed: embedding dim must be positive, got ", dim)


def check_format(fmt: int) -> None:
    if fmt not in FORMATS.values():
        fail(ValueError, "qembed: unknown format ", fmt,
             " (0 symmetric per-row step, 1 symmetric per-table step, 2 affine)")


def check_same_device(a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    if a.device != b.device:
        fail(ValueError, "qembed: ", an, " is on ", a.device, " but ", bn, " is on ", b.device)


def check_rows(rows: torch.Tensor, dim: int, bits: int, fmt: int) -> None:
    """A packed table: uint8 [N, row_bytes(dim, bits, fmt)]."""
    check_bits_dim(bits, dim)
    check_format(fmt)
    if rows.dtype != torch.uint8:
        fail(TypeError, "qembed: packed rows must be uint8, got ", dtype_name(rows.dtype))
    if rows.dim() != 2:
        fail(ValueError, "qembed: packed rows must be 2-D, got ", rows.dim(), "-D")
    expect = row_bytes(dim, bits, fmt)
    if rows.shape[1] != expect:
        fail(ValueError, "qembed: packed rows have ", rows.shape[1], " bytes but dim=", dim,
             ", bits=", bits, ", format=", fmt, " needs ", expect)


def check_table_step(step: torch.Tensor | None, fmt: int, rows: torch.Tensor) -> None:
    """The step of a symmetric_table table: float32 [1] beside the rows."""
    if fmt != SYM_TABLE:
        return
    if step is None or step.numel() != 1:
        fail(ValueError, "qembed: format 1 (per-table step) needs a step tensor with one element")
    if step.dtype != torch.float32:
        fail(TypeError, "qembed: step must be float32, got ", dtype_name(step.dtype))
    check_same_device(step, "step", rows, "rows")


def check_index_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        fail(TypeError, "qembed: ", name, " must be int32 or int64, got ", dtype_name(t.dtype))
    if t.dim() != 1:
        fail(ValueError, "qembed: ", name, " must be 1-D, got ", t.dim(), "-D")


def check_mode(mode: int) -> None:
    if mode not in POOLINGS.values():
        fail(ValueError, "qembed: mode must be 0 (sum), 1 (mean) or 2 (none), got ", mode)


def check_output_dtype(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        fail(TypeError, "qembed: output dtype must be float32, float16 or bfloat16, got ",
             dtype_name(dtype))


def check_per_sample_weights(psw: torch.Tensor | None, mode: int, n: int, base: torch.Tensor,
                             base_name: str) -> None:
    """Floating-point weights of the shape of the n indices, with mode sum or none."""
    if psw is None:
        return
    if mode == POOL_MEAN:
        fail(ValueError, "qembed: per_sample_weights are only supported with mode 'sum' or 'none'")
    if psw.dim() != 1 or psw.numel() != n:
        fail(ValueError, "qembed: per_sample_weights must have the shape of indices (", n,
             ",), got ", _sizes(psw))
    if psw.dtype not in FLOAT_DTYPES:
        fail(TypeError, "qembed: per_sample_weights must be floating point, got ",
             dtype_name(psw.dtype))
    check_same_device(psw, "per_sample_weights", base, base_name)


def check_offsets(offsets: torch.Tensor, include_last_offset: bool, base: torch.Tensor,
                  base_name: str) -> int:
    """The offsets of pooled bags; returns the number of bags."""
    check_index_dtype(offsets, "offsets")
    check_same_device(offsets, "offsets", base, base_name)
    if include_last_offset and offsets.numel() < 1:
        fail(ValueError, "qembed: with include_last_offset, offsets needs at least one element")
    return offsets.numel() - (1 if include_last_offset else 0)


def check_bags(mode: int, n: int, offsets: torch.Tensor | None, include_last_offset: bool,
               base: torch.Tensor, base_name: str) -> int:
    """The number of outputs of a lookup of n indices: one per index with mode none, else one
    per bag of ``offsets``."""
    if mode == POOL_NONE:
        return n
    return check_offsets(offsets, include_last_offset, base, base_name)


def check_pack_args(codes: torch.Tensor, bits: int) -> None:
    """pack: uint8 codes [N, D]."""
    if codes.dtype != torch.uint8:
        fail(TypeError, "qembed.pack: codes must be uint8, got ", dtype_name(codes.dtype))
    if codes.dim() != 2:
        fail(ValueError, "qembed.pack: codes must be 2-D, got ", codes.dim(), "-D")
    check_bits_dim(bits, codes.shape[1])


def check_unpack_args(packed: torch.Tensor, bits: int, dim: int) -> None:
    """unpack: uint8 [N, >= dim*bits/8]."""
    check_bits_dim(bits, dim)
    if packed.dtype != torch.uint8:
        fail(TypeError, "qembed.unpack: packed must be uint8, got ", dtype_name(packed.dtype))
    if packed.dim() != 2:
        fail(ValueError, "qembed.unpack: packed must be 2-D, got ", packed.dim(), "-D")
    if packed.shape[1] < code_bytes(dim, bits):
        fail(ValueError, "qembed.unpack: rows of ", packed.shape[1], " bytes cannot hold ", dim,
             " codes of ", bits, " bits")


def check_quantize_args(weight: torch.Tensor, bits: int, fmt: int,
                        step: torch.Tensor | None) -> None:
    """quantize: fp32 weight [N, D] and, for the symmetric formats, a float32 step of 1
    element (or N for symmetric)."""
    if weight.dtype != torch.float32:
        fail(TypeError, "qembed.quantize: weight must be float32, got ", dtype_name(weight.dtype))
    if weight.dim() != 2:
        fail(ValueError, "qembed.quantize: weight must be 2-D, got ", weight.dim(), "-D")
    check_bits_dim(bits, weight.shape[1])
    check_format(fmt)
    if fmt == AFFINE:
        return
    if step is None:
        fail(ValueError, "qembed.quantize: symmetric formats need a step")
    if step.dtype != torch.float32:
        fail(TypeError, "qembed.quantize: step must be float32")
    check_same_device(step, "step", weight, "weight")
    allowed = weight.shape[0] if fmt == SYM_ROW else 1
    if step.numel() != 1 and step.numel() != allowed:
        fail(ValueError, "qembed.quantize: step must have 1", " or N" if fmt == SYM_ROW else "",
             " elements, got ", step.numel())


def check_lookup_args(rows: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None,
                      psw: torch.Tensor | None, step: torch.Tensor | None, bits: int, dim: int,
                      fmt: int, mode: int, include_last_offset: bool,
                      out_dtype: torch.dtype) -> int:
    """embedding_bag's arguments; returns the number of output rows."""
    check_rows(rows, dim, bits, fmt)
    check_table_step(step, fmt, rows)
    check_mode(mode)
    check_output_dtype(out_dtype)
    check_index_dtype(indices, "indices")
    check_same_device(indices, "indices", rows, "the table")
    check_per_sample_weights(psw, mode, indices.numel(), rows, "the table")
    return check_bags(mode, indices.numel(), offsets, include_last_offset, rows, "the table")


def check_backward_args(grad_out: torch.Tensor, indices: torch.Tensor,
                        offsets: torch.Tensor | None, psw: torch.Tensor | None, mode: int,
                        include_last_offset: bool) -> None:
    """embedding_bag_backward's arguments: grad_out [num outputs, D] floating point, the
    lookup's indices, offsets and weights beside it."""
    check_mode(mode)
    if grad_out.dim() != 2:
        fail(ValueError, "qembed.embedding_bag_backward: grad_out must be 2-D, got ",
             grad_out.dim(), "-D")
    if not grad_out.is_floating_point():
        fail(TypeError, "qembed.embedding_bag_backward: grad_out must be floating point")
    check_index_dtype(indices, "indices")
    check_same_device(indices, "indices", grad_out, "grad_out")
    n = indices.numel()
    check_per_sample_weights(psw, mode, n, grad_out, "grad_out")
    num_out = check_bags(mode, n, offsets, include_last_offset, grad_out, "grad_out")
    if grad_out.shape[0] != num_out:
        fail(ValueError, "qembed.embedding_bag_backward: grad_out has ", grad_out.shape[0],
             " rows, expected one per ", "index" if mode == POOL_NONE else "bag", " (", num_out,
             ")")


def check_psw_backward_args(grad_out: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor,
                            offsets: torch.Tensor | None, step: torch.Tensor | None, bits: int,
                            dim: int, fmt: int, mode: int, include_last_offset: bool) -> int:
    """embedding_bag_psw_backward's arguments: the lookup's (sum or none) and grad_out
    [num outputs, dim] beside the table; returns the number of outputs."""
    num_out = check_lookup_args(rows, indices, offsets, None, step, bits, dim, fmt, mode,
                                include_last_offset, torch.float32)
    if mode == POOL_MEAN:
        fail(ValueError, "qembed: per_sample_weights are only supported with mode 'sum' or 'none'")
    if grad_out.dim() != 2 or grad_out.shape[0] != num_out or grad_out.shape[1] != dim:
        fail(ValueError, "qembed.embedding_bag_psw_backward: grad_out must be [", num_out, ", ",
             dim, "], got ", _sizes(grad_out))
    check_same_device(grad_out, "grad_out", rows, "the table")
    return num_out


def check_update_f32(t: torch.Tensor, name: str, n0: int, n1: int, rows: torch.Tensor) -> None:
    """lowp_update's float32 tensors: contiguous [n0, n1] beside the table."""
    if t.dtype != torch.float32:
        fail(TypeError, "qembed.lowp_update: ", name, " must be float32, got ",
             dtype_name(t.dtype))
    if t.dim() != 2 or t.shape[0] != n0 or t.shape[1] != n1 or not t.is_contiguous():
        fail(ValueError, "qembed.lowp_update: ", name, " must be a contiguous [", n0, ", ", n1,
             "] tensor, got ", _sizes(t))
    check_same_device(t, name, rows, "rows")


def check_update_table_args(rows: torch.Tensor, step: torch.Tensor | None, state: torch.Tensor,
                            step_state: torch.Tensor, bits: int, dim: int, fmt: int,
                            optimizer: int, iteration: int, learn_step: bool,
                            step_optimizer: int, row_offset: int = 0,
                            column_offset: int = 0) -> None:
    """lowp_update's arguments about the table: its rows, step, state and options. The key
    offsets place a shard's rows and elements in its whole table: not negative, columns by
    whole groups of 8."""
    check_rows(rows, dim, bits, fmt)
    if fmt == AFFINE:
        fail(ValueError, "qembed.lowp_update: training needs a symmetric format")
    if not rows.is_contiguous():
        fail(ValueError, "qembed.lowp_update: rows must be contiguous")
    check_table_step(step, fmt, rows)
    if optimizer not in OPTIMIZERS.values():
        fail(ValueError, "qembed.lowp_update: optimizer must be 0 (sgd), 1 (adagrad), 2 (adam) "
             "or 3 (none), got ", optimizer)
    if step_optimizer not in STEP_OPTIMIZERS.values():
        fail(ValueError, "qembed.lowp_update: step_optimizer must be 0 (sgd) or 1 (adam), got ",
             step_optimizer)
    if iteration < 1:
        fail(ValueError, "qembed.lowp_update: iteration counts from 1, got ", iteration)
    if row_offset < 0:
        fail(ValueError, "qembed.lowp_update: row_offset must not be negative, got ", row_offset)
    if column_offset < 0 or column_offset % 8:
        fail(ValueError, "qembed.lowp_update: column_offset must be a non-negative multiple of "
             "8, got ", column_offset)
    num_rows = rows.shape[0]
    width = state_width(optimizer, dim)
    if width > 0:
        check_update_f32(state, "state", num_rows, width, rows)
    if learn_step and step_optimizer == STEP_OPTIMIZERS["adam"]:
        check_update_f32(step_state, "step_state", num_rows if fmt == SYM_ROW else 1, 2, rows)


def check_update_args(rows: torch.Tensor, step: torch.Tensor | None, state: torch.Tensor,
                      step_state: torch.Tensor, unique_rows: torch.Tensor, grad: torch.Tensor,
                      weights: torch.Tensor | None, weights_out: torch.Tensor | None, bits: int,
                      dim: int, fmt: int, optimizer: int, iteration: int, learn_step: bool,
                      step_optimizer: int, row_offset: int = 0, column_offset: int = 0) -> None:
    """lowp_update's arguments, all but the values of unique_rows (check_update_rows_values);
    ``grad`` is grad_rows made contiguous."""
    check_update_table_args(rows, step, state, step_state, bits, dim, fmt, optimizer, iteration,
                            learn_step, step_optimizer, row_offset, column_offset)
    check_index_dtype(unique_rows, "unique_rows")
    check_same_device(unique_rows, "unique_rows", rows, "rows")
    u = unique_rows.numel()
    check_update_f32(grad, "grad_rows", u, dim, rows)
    if weights is not None:
        check_update_f32(weights, "weights", u, dim, rows)
    if weights_out is not None:
        check_update_f32(weights_out, "weights_out", u, dim, rows)


# --- embedding_bags and its backward ops (every feature of a KeyedJaggedTensor batch) ------

def check_bags_tables(op: str, tables: list[torch.Tensor], steps: list[torch.Tensor],
                      bits: list[int], dims: list[int], formats: list[int],
                      device: torch.device) -> None:
    """The tables: table t is uint8 [R_t, row_bytes(dims[t], bits[t], formats[t])] on
    ``device``, with steps[t] fp32 [1] beside it for the per-table-step format; ``op``
    prefixes messages."""
    n = len(tables)
    if n < 1:
        fail(ValueError, op, "at least one table is needed")
    if not len(steps) == len(bits) == len(dims) == len(formats) == n:
        fail(ValueError, op, "steps, bits, dims and formats need one entry per table (", n,
             "), got ", len(steps), ", ", len(bits), ", ", len(dims), ", ", len(formats))
    for t, rows in enumerate(tables):
        if not 1 <= bits[t] <= 8:
            fail(ValueError, op, "table ", t, ": bits must be in 1..8, got ", bits[t])
        if dims[t] <= 0:
            fail(ValueError, op, "table ", t, ": dim must be positive, got ", dims[t])
        if formats[t] not in FORMATS.values():
            fail(ValueError, op, "table ", t, ": unknown format ", formats[t])
        if rows.dtype != torch.uint8:
            fail(TypeError, op, "table ", t, " must be uint8 packed rows, got ",
                 dtype_name(rows.dtype))
        expect = row_bytes(dims[t], bits[t], formats[t])
        if rows.dim() != 2 or rows.shape[1] != expect:
            fail(ValueError, op, "table ", t, " must be [R, ", expect, "] for dim=", dims[t],
                 ", bits=", bits[t], ", format=", formats[t], ", got ", _sizes(rows))
        if rows.device != device:
            fail(ValueError, op, "table ", t, " is on ", rows.device, " but the values are on ",
                 device)
        if formats[t] == SYM_TABLE:
            if steps[t].numel() != 1 or steps[t].dtype != torch.float32:
                fail(ValueError, op, "table ", t,
                     " (per-table step) needs a float32 step of one element")
            if steps[t].device != device:
                fail(ValueError, op, "the step of table ", t, " is on ", steps[t].device,
                     " but the values are on ", device)


def check_bags_features(op: str, dims: list[int], feature_tables: list[int],
                        feature_columns: list[int], poolings: list[int], values: torch.Tensor,
                        offsets: torch.Tensor, psw: torch.Tensor | None) -> tuple[int, int]:
    """The features over tables of widths dims: feature f reads table feature_tables[f],
    pools by poolings[f] (sum, or mean, which takes no per-sample weights) and fills the
    output columns [feature_columns[f], + its table's dim), the blocks side by side from
    column 0; values [N] and offsets [F * B + 1] (key-major) int32/int64, per-sample weights
    [N] floating point, all on one device. Returns (B, output width)."""
    check_index_dtype(values, "values")
    check_index_dtype(offsets, "offsets")
    check_same_device(offsets, "offsets", values, "values")
    num_features, num_tables = len(feature_tables), len(dims)
    if num_features < 1:
        fail(ValueError, op, "at least one feature is needed")
    if len(feature_columns) != num_features or len(poolings) != num_features:
        fail(ValueError, op, "feature_columns and poolings need one entry per feature (",
             num_features, ")")
    blocks = []
    for f, t in enumerate(feature_tables):
        if not 0 <= t < num_tables:
            fail(ValueError, op, "feature ", f, " reads table ", t, ", but there are ",
                 num_tables, " tables")
        if poolings[f] not in (POOL_SUM, POOL_MEAN):
            fail(ValueError, op, "feature ", f, ": pooling must be 0 (sum) or 1 (mean), got ",
                 poolings[f])
        if psw is not None and poolings[f] == POOL_MEAN:
            fail(ValueError, op, "feature ", f, " pools by mean, which takes no per-sample "
                 "weights")
        blocks.append((feature_columns[f], dims[t]))
    column = 0
    for first, width in sorted(blocks):
        if first != column:
            fail(ValueError, op, "feature_columns must place the features' blocks side by side "
                 "from column 0, but a block starts at column ", first, " where ", column,
                 " was expected")
        column += width
    if offsets.numel() < 1 or (offsets.numel() - 1) % num_features:
        fail(ValueError, op, "offsets must have F * B + 1 entries for F = ", num_features,
             " features, got ", offsets.numel())
    if psw is not None:
        if psw.dim() != 1 or psw.numel() != values.numel():
            fail(ValueError, op, "per_sample_weights must have one weight per value (",
                 values.numel(), "), got ", _sizes(psw))
        if psw.dtype not in FLOAT_DTYPES:
            fail(TypeError, op, "per_sample_weights must be floating point, got ",
                 dtype_name(psw.dtype))
        check_same_device(psw, "per_sample_weights", values, "values")
    return (offsets.numel() - 1) // num_features, column


def check_bags_args(tables: list[torch.Tensor], steps: list[torch.Tensor], bits: list[int],
                    dims: list[int], formats: list[int], feature_tables: list[int],
                    feature_columns: list[int], poolings: list[int], values: torch.Tensor,
                    offsets: torch.Tensor, psw: torch.Tensor | None,
                    out_dtype: torch.dtype) -> tuple[int, int]:
    """embedding_bags' arguments; returns (batch size, output width)."""
    op = "qembed.embedding_bags: "
    check_output_dtype(out_dtype)
    check_bags_tables(op, tables, steps, bits, dims, formats, values.device)
    return check_bags_features(op, dims, feature_tables, feature_columns, poolings, values,
                               offsets, psw)


def check_bags_grad_out(op: str, grad_out: torch.Tensor, shape: tuple[int, int],
                        values: torch.Tensor) -> None:
    """The output gradient of a batch of that shape: floating point [B, W] beside values."""
    if not grad_out.is_floating_point():
        fail(TypeError, op, "grad_out must be floating point, got ", dtype_name(grad_out.dtype))
    if _sizes(grad_out) != list(shape):
        fail(ValueError, op, "grad_out must be [", shape[0], ", ", shape[1], "], got ",
             _sizes(grad_out))
    check_same_device(grad_out, "grad_out", values, "values")


def check_bags_backward_args(grad_out: torch.Tensor, dims: list[int], feature_tables: list[int],
                             feature_columns: list[int], poolings: list[int],
                             values: torch.Tensor, offsets: torch.Tensor,
                             psw: torch.Tensor | None,
                             op: str = "qembed.embedding_bags_backward: ") -> tuple[int, int]:
    """embedding_bags_backward's arguments; returns (batch size, output width)."""
    shape = check_bags_features(op, dims, feature_tables, feature_columns, poolings, values,
                                offsets, psw)
    check_bags_grad_out(op, grad_out, shape, values)
    return shape


def check_bags_psw_backward_args(grad_out: torch.Tensor, tables: list[torch.Tensor],
                                 steps: list[torch.Tensor], bits: list[int], dims: list[int],
                                 formats: list[int], feature_tables: list[int],
                                 feature_columns: list[int], values: torch.Tensor,
                                 offsets: torch.Tensor) -> tuple[int, int]:
    """embedding_bags_psw_backward's arguments (a lookup pooled by sum); returns (batch
    size, output width)."""
    op = "qembed.embedding_bags_psw_backward: "
    check_bags_tables(op, tables, steps, bits, dims, formats, values.device)
    shape = check_bags_features(op, dims, feature_tables, feature_columns,
                                [POOL_SUM] * len(feature_tables), values, offsets, None)
    check_bags_grad_out(op, grad_out, shape, values)
    return shape


def check_bags_update_tables(op: str, tables: list[torch.Tensor], steps: list[torch.Tensor],
                             states: list[torch.Tensor], step_states: list[torch.Tensor],
                             bits: list[int], dims: list[int], formats: list[int],
                             optimizer: int, learn_step: bool, step_optimizer: int,
                             seeds: list[int], counters: list[int],
                             row_offsets: list[int] | None = None,
                             column_offsets: list[int] | None = None) -> None:
    """The update of every table (embedding_bags_update, embedding_bags_backward_update): one
    entry per table in every list (the key offsets' lists may be None: all 0), table t's as
    lowp_update checks them (iteration = counters[t]), every table on table 0's device."""
    n = len(tables)
    row_offsets = [0] * n if row_offsets is None else row_offsets
    column_offsets = [0] * n if column_offsets is None else column_offsets
    if n < 1 or any(len(x) != n for x in (steps, states, step_states, bits, dims, formats,
                                          seeds, counters, row_offsets, column_offsets)):
        fail(ValueError, op, "at least one table is needed, and every list needs one entry per "
             "table (", n, ")")
    for t in range(n):
        check_update_table_args(tables[t], steps[t] if formats[t] == SYM_TABLE else None,
                                states[t], step_states[t], bits[t], dims[t], formats[t],
                                optimizer, counters[t], learn_step, step_optimizer,
                                row_offsets[t], column_offsets[t])
        check_same_device(tables[t], "every table", tables[0], "table 0")


def check_bags_update_args(tables: list[torch.Tensor], steps: list[torch.Tensor],
                           states: list[torch.Tensor], step_states: list[torch.Tensor],
                           unique_rows: list[torch.Tensor], grads: list[torch.Tensor],
                           bits: list[int], dims: list[int], formats: list[int], optimizer: int,
                           learn_step: bool, step_optimizer: int, seeds: list[int],
                           counters: list[int], row_offsets: list[int] | None = None,
                           column_offsets: list[int] | None = None) -> None:
    """embedding_bags_update's arguments: the tables' (check_bags_update_tables) and table
    t's unique_rows[t] and grads[t] (grad_rows[t] made contiguous) as lowp_update checks
    them."""
    op = "qembed.embedding_bags_update: "
    check_bags_update_tables(op, tables, steps, states, step_states, bits, dims, formats,
                             optimizer, learn_step, step_optimizer, seeds, counters,
                             row_offsets, column_offsets)
    n = len(tables)
    if len(unique_rows) != n or len(grads) != n:
        fail(ValueError, op, "at least one table is needed, and every list needs one entry per "
             "table (", n, ")")
    for t in range(n):
        check_index_dtype(unique_rows[t], "unique_rows")
        check_same_device(unique_rows[t], "unique_rows", tables[t], "rows")
        check_update_f32(grads[t], "grad_rows", unique_rows[t].numel(), dims[t], tables[t])


def check_bags_backward_update_args(grad_out: torch.Tensor, feature_tables: list[int],
                                    feature_columns: list[int], poolings: list[int],
                                    values: torch.Tensor, offsets: torch.Tensor,
                                    psw: torch.Tensor | None, tables: list[torch.Tensor],
                                    steps: list[torch.Tensor], states: list[torch.Tensor],
                                    step_states: list[torch.Tensor], bits: list[int],
                                    dims: list[int], formats: list[int], optimizer: int,
                                    learn_step: bool, step_optimizer: int, seeds: list[int],
                                    counters: list[int], row_offsets: list[int] | None = None,
                                    column_offsets: list[int] | None = None) -> tuple[int, int]:
    """embedding_bags_backward_update's arguments: the lookup's (the tables on values'
    device) with grad_out, and the update's; returns (batch size, output width)."""
    op = "qembed.embedding_bags_backward_update: "
    check_bags_tables(op, tables, steps, bits, dims, formats, values.device)
    shape = check_bags_backward_args(grad_out, dims, feature_tables, feature_columns, poolings,
                                     values, offsets, psw, op)
    check_bags_update_tables(op, tables, steps, states, step_states, bits, dims, formats,
                             optimizer, learn_step, step_optimizer, seeds, counters, row_offsets,
                             column_offsets)
    return shape


def check_f32_shape(t: torch.Tensor, op: str, name: str, shape: list[int]) -> None:
    if t.dtype != torch.float32:
        fail(TypeError, "qembed.", op, ": ", name, " must be float32, got ", dtype_name(t.dtype))
    if _sizes(t) != list(shape):
        fail(ValueError, "qembed.", op, ": ", name, " must have shape ", list(shape), ", got ",
             _sizes(t))


def check_search_args(op: str, weight: torch.Tensor, row_group: torch.Tensor,
                      probs: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                      bits: list[int]) -> None:
    """The MPE search's tensors: fp32 weight [R, D], int64 row_group [R], fp32 probs [G, m],
    alpha [m], beta [D], all on weight's device, and m candidate widths in 0..8."""
    if weight.dim() != 2:
        fail(ValueError, "qembed.", op, ": weight must be 2-D, got ", weight.dim(), "-D")
    rows, dim, m = weight.shape[0], weight.shape[1], len(bits)
    if m < 1:
        fail(ValueError, "qembed.", op, ": at least one candidate bit width is needed")
    for b in bits:
        if not 0 <= b <= 8:
            fail(ValueError, "qembed.", op, ": candidate bit widths must be in 0..8, got ", b)
    check_f32_shape(weight, op, "weight", [rows, dim])
    if probs.dim() != 2:
        fail(ValueError, "qembed.", op, ": probs must be [G, ", m, "]")
    check_f32_shape(probs, op, "probs", [probs.shape[0], m])
    check_f32_shape(alpha, op, "alpha", [m])
    check_f32_shape(beta, op, "beta", [dim])
    if row_group.dtype != torch.int64:
        fail(TypeError, "qembed.", op, ": row_group must be int64, got ",
             dtype_name(row_group.dtype))
    if row_group.dim() != 1 or row_group.numel() != rows:
        fail(ValueError, "qembed.", op, ": row_group must have one entry per row (", rows,
             "), got ", _sizes(row_group))
    for t in (row_group, probs, alpha, beta):
        check_same_device(t, "a quantizer tensor", weight, "weight")


def check_search_lookup_args(weight: torch.Tensor, indices: torch.Tensor,
                            offsets: torch.Tensor | None, mode: int,
                            include_last_offset: bool) -> int:
    """mpe_search_forward's indices and bags (its quantizer: check_search_args); returns the
    number of output rows."""
    check_mode(mode)
    check_index_dtype(indices, "indices")
    check_same_device(indices, "indices", weight, "weight")
    return check_bags(mode, indices.numel(), offsets, include_last_offset, weight, "weight")


def check_search_rows_args(weight: torch.Tensor, unique_rows: torch.Tensor,
                           grad_rows: torch.Tensor, numel: int) -> None:
    """mpe_search_backward's rows (its quantizer: check_search_args): unique_rows [U] and
    their gradients fp32 [U, D] beside weight, and the number of values looked up."""
    op = "mpe_search_backward"
    check_index_dtype(unique_rows, "unique_rows")
    check_same_device(unique_rows, "unique_rows", weight, "weight")
    check_same_device(grad_rows, "grad_rows", weight, "weight")
    u = unique_rows.numel()
    check_f32_shape(grad_rows, op, "grad_rows", [u, weight.shape[1]])
    if numel <= 0 and u != 0:
        fail(ValueError, "qembed.", op, ": numel (values looked up) must be positive, got ",
             numel)


def check_mixed_lookup_args(segments: list[torch.Tensor], bits: list[int], steps: torch.Tensor,
                            beta: torch.Tensor, location: torch.Tensor, indices: torch.Tensor,
                            offsets: torch.Tensor | None, psw: torch.Tensor | None, mode: int,
                            include_last_offset: bool, out_dtype: torch.dtype) -> int:
    """mpe_embedding_bag's arguments (a row map, or row ranges [K + 1, 2]: a 2-D location);
    returns the number of output rows."""
    op = "qembed.mpe_embedding_bag: "
    check_mode(mode)
    check_output_dtype(out_dtype)
    if len(bits) != len(segments):
        fail(ValueError, op, "one bit width per segment is needed, got ", len(bits), " for ",
             len(segments))
    if beta.dtype != torch.float32 or steps.dtype != torch.float32:
        fail(TypeError, op, "steps and beta must be float32")
    if beta.dim() != 1 or beta.numel() == 0:
        fail(ValueError, op, "beta must be 1-D of the embedding dim, got ",
             _sizes(beta))
    if steps.dim() != 1 or steps.numel() != len(segments):
        fail(ValueError, op, "steps must have one entry per segment (", len(segments), "), got ",
             _sizes(steps))
    if location.dim() == 2:
        if location.dtype != torch.int32:
            fail(TypeError, op, "row ranges must be int32, got ", dtype_name(location.dtype))
        if location.shape[0] < 1 or location.shape[1] != 2:
            fail(ValueError, op, "row ranges must be [K + 1, 2], got ", _sizes(location))
    else:
        if location.dtype not in (torch.int32, torch.int16):
            fail(TypeError, op, "a row map must be int16 or int32, got ",
                 dtype_name(location.dtype))
        if location.dim() != 1:
            fail(ValueError, op, "location must be a 1-D row map or [K + 1, 2] row ranges, got ",
                 _sizes(location))
    check_same_device(location, "location", beta, "beta")
    check_same_device(steps, "steps", beta, "beta")
    dim = beta.numel()
    for s, (seg, b) in enumerate(zip(segments, bits)):
        check_bits_dim(b, dim)
        if seg.dtype != torch.uint8:
            fail(TypeError, op, "segment ", s, " must be uint8")
        if seg.dim() != 2 or seg.shape[1] < code_bytes(dim, b):
            fail(ValueError, op, "segment ", s, " must be [rows, >= ", code_bytes(dim, b),
                 "] bytes for ", b, " bits, got ", _sizes(seg))
        check_same_device(seg, "a segment", beta, "beta")
    check_index_dtype(indices, "indices")
    check_same_device(indices, "indices", beta, "beta")
    check_per_sample_weights(psw, mode, indices.numel(), beta, "beta")
    return check_bags(mode, indices.numel(), offsets, include_last_offset, beta, "beta")


# --- values --------------------------------------------------------------------------------

def _first(mask: torch.Tensor) -> int:
    """Position of the first True in mask, or -1."""
    hits = mask.nonzero()
    return int(hits[0, 0]) if hits.numel() else -1


def check_indices_values(indices: torch.Tensor, num_rows: int) -> None:
    """Every index inside the table; names the first that is not."""
    idx = indices.long()
    i = _first((idx < 0) | (idx >= num_rows))
    if i >= 0:
        fail(IndexError, "qembed.embedding_bag: index ", int(idx[i]), " at position ", i,
             " is out of range for a table of ", num_rows, " rows")


def check_offsets_values(offsets: torch.Tensor, num_indices: int) -> None:
    """Offsets that start at 0, never decrease and stay within the indices."""
    if not offsets.numel():
        return
    off = offsets.long()
    if int(off[0]) != 0:
        fail(ValueError, "qembed.embedding_bag: offsets[0] must be 0, got ", int(off[0]))
    b = _first(off[1:] < off[:-1]) + 1
    if b > 0:
        fail(ValueError, "qembed.embedding_bag: offsets must be non-decreasing, but offsets[", b,
             "] = ", int(off[b]), " < offsets[", b - 1, "] = ", int(off[b - 1]))
    b = _first(off > num_indices)
    if b >= 0:
        fail(ValueError, "qembed.embedding_bag: offsets[", b, "] = ", int(off[b]),
             " is past the end of indices (", num_indices, ")")


def check_update_rows_values(unique_rows: torch.Tensor, num_rows: int) -> None:
    """lowp_update's rows: inside the table and strictly increasing."""
    r = unique_rows.long()
    k = _first((r < 0) | (r >= num_rows))
    if k >= 0:
        fail(IndexError, "qembed.lowp_update: row ", int(r[k]), " is out of range for a table "
             "of ", num_rows, " rows")
    if _first(r[1:] <= r[:-1]) >= 0:
        fail(ValueError, "qembed.lowp_update: unique_rows must be strictly increasing (as "
             "embedding_bag_backward returns them)")


def check_bags_offsets_values(op: str, offsets: torch.Tensor, batch: int,
                              num_values: int) -> None:
    """embedding_bags' offsets: from 0, non-decreasing, ending at the number of values; a
    message names the bag and feature."""
    off = offsets.long()
    if int(off[0]) != 0:
        fail(ValueError, op, "offsets[0] must be 0, got ", int(off[0]))
    k = _first(off[1:] < off[:-1]) + 1
    if k > 0:
        fail(ValueError, op, "offsets must be non-decreasing, but bag ", (k - 1) % batch,
             " of feature ", (k - 1) // batch, " has offsets ", int(off[k - 1]), " to ",
             int(off[k]))
    if int(off[-1]) != num_values:
        fail(ValueError, op, "offsets end at ", int(off[-1]), " but there are ", num_values,
             " values (lengths and values disagree)")


def check_bags_ids_values(op: str, values: torch.Tensor, offsets: torch.Tensor, batch: int,
                          feature_tables: list[int], num_rows: list[int]) -> None:
    """Every value inside the table its feature reads; names the first that is not."""
    off, ids = offsets.long(), values.long()
    for f, t in enumerate(feature_tables):
        start = int(off[f * batch])
        part = ids[start: int(off[(f + 1) * batch])]
        k = _first((part < 0) | (part >= num_rows[t]))
        if k >= 0:
            fail(IndexError, op, "feature ", f, " (table ", t, ") has id ", int(part[k]),
                 " at position ", start + k, ", outside its table of ", num_rows[t], " rows")


def check_bags_update_rows_values(unique_rows: torch.Tensor, num_rows: int, t: int) -> None:
    """embedding_bags_update's rows of table t: inside it and strictly increasing."""
    op = "qembed.embedding_bags_update: "
    r = unique_rows.long()
    k = _first((r < 0) | (r >= num_rows))
    if k >= 0:
        fail(IndexError, op, "table ", t, ": row ", int(r[k]), " is out of range for its ",
             num_rows, " rows")
    if _first(r[1:] <= r[:-1]) >= 0:
        fail(ValueError, op, "table ", t, ": unique_rows must be strictly increasing (as "
             "embedding_bags_backward returns them)")
