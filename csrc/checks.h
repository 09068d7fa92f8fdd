// Argument checks shared by the CPU and CUDA entry points. Each raises the Python
// exception that names the problem (ValueError, TypeError, IndexError) before any kernel
// reads memory.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>
#include <algorithm>
#include <utility>
#include <vector>
#include "layout.h"
#include "optim.h"

namespace qembed {

inline void check_bits_dim(int64_t bits, int64_t dim) {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, "qembed: bits must be in 1..8, got ", bits);
  TORCH_CHECK_VALUE(dim > 0, "qembed: embedding dim must be positive, got ", dim);
}

inline void check_format(int64_t fmt) {
  TORCH_CHECK_VALUE(valid_format(fmt), "qembed: unknown format ", fmt,
                    " (0 symmetric per-row step, 1 symmetric per-table step, 2 affine)");
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "qembed: ", an, " is on ", a.device(), " but ",
                    bn, " is on ", b.device());
}

// A packed table: uint8 [N, row_bytes(dim, bits, fmt)], rows contiguous.
inline void check_rows(const at::Tensor& rows, int64_t dim, int64_t bits, int64_t fmt) {
  check_bits_dim(bits, dim);
  check_format(fmt);
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kByte, "qembed: packed rows must be uint8, got ",
                   rows.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 2, "qembed: packed rows must be 2-D, got ", rows.dim(), "-D");
  const int64_t expect = row_bytes(dim, bits, fmt);
  TORCH_CHECK_VALUE(rows.size(1) == expect, "qembed: packed rows have ", rows.size(1),
                    " bytes but dim=", dim, ", bits=", bits, ", format=", fmt, " needs ", expect);
}

// The step of a symmetric table: [1] for SYM_TABLE; absent otherwise.
inline void check_table_step(const c10::optional<at::Tensor>& step, int64_t fmt,
                             const at::Tensor& rows) {
  if (fmt != SYM_TABLE) return;
  TORCH_CHECK_VALUE(step.has_value() && step->numel() == 1,
                    "qembed: format 1 (per-table step) needs a step tensor with one element");
  TORCH_CHECK_TYPE(step->scalar_type() == at::kFloat, "qembed: step must be float32, got ",
                   step->scalar_type());
  check_same_device(*step, "step", rows, "rows");
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "qembed: ",
                   name, " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, "qembed: ", name, " must be 1-D, got ", t.dim(), "-D");
}

inline void check_mode(int64_t mode) {
  TORCH_CHECK_VALUE(mode >= POOL_SUM && mode <= POOL_NONE, "qembed: mode must be 0 (sum), ",
                    "1 (mean) or 2 (none), got ", mode);
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_output_dtype(at::ScalarType out_dtype) {
  TORCH_CHECK_TYPE(is_float_dtype(out_dtype),
                   "qembed: output dtype must be float32, float16 or bfloat16, got ", out_dtype);
}

// Floating-point weights of the shape of the n indices, with mode sum or none.
inline void check_per_sample_weights(const c10::optional<at::Tensor>& psw, int64_t mode,
                                     int64_t n, const at::Tensor& base, const char* base_name) {
  if (!psw.has_value()) return;
  TORCH_CHECK_VALUE(mode != POOL_MEAN,
                    "qembed: per_sample_weights are only supported with mode 'sum' or 'none'");
  TORCH_CHECK_VALUE(psw->dim() == 1 && psw->numel() == n,
                    "qembed: per_sample_weights must have the shape of indices (", n, ",), got ",
                    psw->sizes());
  TORCH_CHECK_TYPE(is_float_dtype(psw->scalar_type()),
                   "qembed: per_sample_weights must be floating point, got ", psw->scalar_type());
  check_same_device(*psw, "per_sample_weights", base, base_name);
}

// The offsets of pooled bags; returns the number of bags.
inline int64_t check_offsets(const at::Tensor& offsets, bool include_last_offset,
                             const at::Tensor& base, const char* base_name) {
  check_index_dtype(offsets, "offsets");
  check_same_device(offsets, "offsets", base, base_name);
  TORCH_CHECK_VALUE(!include_last_offset || offsets.numel() >= 1,
                    "qembed: with include_last_offset, offsets needs at least one element");
  return offsets.numel() - (include_last_offset ? 1 : 0);
}

// The number of outputs of a lookup of n indices: one per index with mode none, else one
// per bag of `offsets`.
inline int64_t check_bags(int64_t mode, int64_t n, const at::Tensor& offsets,
                          bool include_last_offset, const at::Tensor& base,
                          const char* base_name) {
  if (mode == POOL_NONE) return n;
  return check_offsets(offsets, include_last_offset, base, base_name);
}

// pack: uint8 codes [N, D].
inline void check_pack_args(const at::Tensor& codes, int64_t bits) {
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, "qembed.pack: codes must be uint8, got ",
                   codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 2, "qembed.pack: codes must be 2-D, got ", codes.dim(), "-D");
  check_bits_dim(bits, codes.size(1));
}

// unpack: uint8 [N, >= code_bytes(dim, bits)].
inline void check_unpack_args(const at::Tensor& packed, int64_t bits, int64_t dim) {
  check_bits_dim(bits, dim);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "qembed.unpack: packed must be uint8, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, "qembed.unpack: packed must be 2-D, got ", packed.dim(),
                    "-D");
  TORCH_CHECK_VALUE(packed.size(1) >= code_bytes(dim, bits), "qembed.unpack: rows of ",
                    packed.size(1), " bytes cannot hold ", dim, " codes of ", bits, " bits");
}

// quantize: fp32 weight [N, D] and, for the symmetric formats, a float32 step of 1 element
// (or N for SYM_ROW). The values (finite weights, positive steps) each device checks itself.
inline void check_quantize_args(const at::Tensor& weight, int64_t bits, int64_t fmt,
                                const c10::optional<at::Tensor>& step) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat,
                   "qembed.quantize: weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, "qembed.quantize: weight must be 2-D, got ",
                    weight.dim(), "-D");
  check_bits_dim(bits, weight.size(1));
  check_format(fmt);
  if (fmt == AFFINE) return;
  TORCH_CHECK_VALUE(step.has_value(), "qembed.quantize: symmetric formats need a step");
  TORCH_CHECK_TYPE(step->scalar_type() == at::kFloat, "qembed.quantize: step must be float32");
  check_same_device(*step, "step", weight, "weight");
  const int64_t allowed = fmt == SYM_ROW ? weight.size(0) : 1;
  TORCH_CHECK_VALUE(step->numel() == 1 || step->numel() == allowed, "qembed.quantize: step must ",
                    "have 1", fmt == SYM_ROW ? " or N" : "", " elements, got ", step->numel());
}

// embedding_bag's arguments; returns the number of output rows.
inline int64_t check_lookup_args(const at::Tensor& rows, const at::Tensor& indices,
                                 const at::Tensor& offsets,
                                 const c10::optional<at::Tensor>& psw,
                                 const c10::optional<at::Tensor>& step, int64_t bits,
                                 int64_t dim, int64_t fmt, int64_t mode,
                                 bool include_last_offset, at::ScalarType out_dtype) {
  check_rows(rows, dim, bits, fmt);
  check_table_step(step, fmt, rows);
  check_mode(mode);
  check_output_dtype(out_dtype);
  check_index_dtype(indices, "indices");
  check_same_device(indices, "indices", rows, "the table");
  check_per_sample_weights(psw, mode, indices.numel(), rows, "the table");
  return check_bags(mode, indices.numel(), offsets, include_last_offset, rows, "the table");
}

// embedding_bag_backward's arguments: grad_out [num outputs, D] floating point, the lookup's
// indices, offsets and weights beside it.
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& indices,
                                const at::Tensor& offsets,
                                const c10::optional<at::Tensor>& psw, int64_t mode,
                                bool include_last_offset) {
  check_mode(mode);
  TORCH_CHECK_VALUE(grad_out.dim() == 2, "qembed.embedding_bag_backward: grad_out must be ",
                    "2-D, got ", grad_out.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(grad_out.scalar_type()),
                   "qembed.embedding_bag_backward: grad_out must be floating point");
  check_index_dtype(indices, "indices");
  check_same_device(indices, "indices", grad_out, "grad_out");
  const int64_t n = indices.numel();
  check_per_sample_weights(psw, mode, n, grad_out, "grad_out");
  const int64_t num_out = check_bags(mode, n, offsets, include_last_offset, grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.size(0) == num_out, "qembed.embedding_bag_backward: grad_out has ",
                    grad_out.size(0), " rows, expected one per ",
                    mode == POOL_NONE ? "index" : "bag", " (", num_out, ")");
}
// embedding_bag_psw_backward's arguments: the lookup's (sum or none) and grad_out
// [num_out, dim] beside the table; returns num_out.
inline int64_t check_psw_backward_args(const at::Tensor& grad_out, const at::Tensor& rows,
                                       const at::Tensor& indices, const at::Tensor& offsets,
                                       const c10::optional<at::Tensor>& step, int64_t bits,
                                       int64_t dim, int64_t fmt, int64_t mode,
                                       bool include_last_offset) {
  const int64_t num_out = check_lookup_args(rows, indices, offsets, c10::nullopt, step, bits,
                                            dim, fmt, mode, include_last_offset, at::kFloat);
  TORCH_CHECK_VALUE(mode != POOL_MEAN,
                    "qembed: per_sample_weights are only supported with mode 'sum' or 'none'");
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == num_out && grad_out.size(1) == dim,
                    "qembed.embedding_bag_psw_backward: grad_out must be [", num_out, ", ", dim,
                    "], got ", grad_out.sizes());
  check_same_device(grad_out, "grad_out", rows, "the table");
  return num_out;
}

// lowp_update's float32 tensors: contiguous [n0, n1] beside the table.
inline void check_update_f32(const at::Tensor& t, const char* name, int64_t n0, int64_t n1,
                             const at::Tensor& rows) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "qembed.lowp_update: ", name,
                   " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == n0 && t.size(1) == n1 && t.is_contiguous(),
                    "qembed.lowp_update: ", name, " must be a contiguous [", n0, ", ", n1,
                    "] tensor, got ", t.sizes());
  check_same_device(t, name, rows, "rows");
}

// lowp_update's arguments about the table: its rows, step, state and options. The key
// offsets place a shard's rows and elements in its whole table: not negative, columns by
// whole groups of 8.
inline void check_update_table_args(const at::Tensor& rows, const c10::optional<at::Tensor>& step,
                                    const at::Tensor& state, const at::Tensor& step_state,
                                    int64_t bits, int64_t dim, int64_t fmt, int64_t optimizer,
                                    int64_t iteration, bool learn_step, int64_t step_optimizer,
                                    int64_t row_offset, int64_t column_offset) {
  check_rows(rows, dim, bits, fmt);
  TORCH_CHECK_VALUE(fmt != AFFINE, "qembed.lowp_update: training needs a symmetric format");
  TORCH_CHECK_VALUE(rows.is_contiguous(), "qembed.lowp_update: rows must be contiguous");
  check_table_step(step, fmt, rows);
  TORCH_CHECK_VALUE(optimizer >= OPT_SGD && optimizer <= OPT_NONE, "qembed.lowp_update: ",
                    "optimizer must be 0 (sgd), 1 (adagrad), 2 (adam) or 3 (none), got ",
                    optimizer);
  TORCH_CHECK_VALUE(step_optimizer == STEP_SGD || step_optimizer == STEP_ADAM,
                    "qembed.lowp_update: step_optimizer must be 0 (sgd) or 1 (adam), got ",
                    step_optimizer);
  TORCH_CHECK_VALUE(iteration >= 1, "qembed.lowp_update: iteration counts from 1, got ",
                    iteration);
  TORCH_CHECK_VALUE(row_offset >= 0, "qembed.lowp_update: row_offset must not be negative, got ",
                    row_offset);
  TORCH_CHECK_VALUE(column_offset >= 0 && column_offset % 8 == 0, "qembed.lowp_update: ",
                    "column_offset must be a non-negative multiple of 8, got ", column_offset);
  const int64_t num_rows = rows.size(0);
  if (state_width(optimizer, dim) > 0)
    check_update_f32(state, "state", num_rows, state_width(optimizer, dim), rows);
  if (learn_step && step_optimizer == STEP_ADAM)
    check_update_f32(step_state, "step_state", fmt == SYM_ROW ? num_rows : 1, 2, rows);
}

// lowp_update's arguments, all but the values of unique_rows (range and order), which each
// device checks its own way. `grad` is grad_rows made contiguous.
inline void check_update_args(const at::Tensor& rows, const c10::optional<at::Tensor>& step,
                              const at::Tensor& state, const at::Tensor& step_state,
                              const at::Tensor& unique_rows, const at::Tensor& grad,
                              const c10::optional<at::Tensor>& weights,
                              const c10::optional<at::Tensor>& weights_out, int64_t bits,
                              int64_t dim, int64_t fmt, int64_t optimizer, int64_t iteration,
                              bool learn_step, int64_t step_optimizer, int64_t row_offset,
                              int64_t column_offset) {
  check_update_table_args(rows, step, state, step_state, bits, dim, fmt, optimizer, iteration,
                          learn_step, step_optimizer, row_offset, column_offset);
  check_index_dtype(unique_rows, "unique_rows");
  check_same_device(unique_rows, "unique_rows", rows, "rows");
  const int64_t u = unique_rows.numel();
  check_update_f32(grad, "grad_rows", u, dim, rows);
  if (weights.has_value()) check_update_f32(*weights, "weights", u, dim, rows);
  if (weights_out.has_value()) check_update_f32(*weights_out, "weights_out", u, dim, rows);
}

// --- embedding_bags and its backward ops (every feature of a KeyedJaggedTensor batch) ---

// embedding_bags' batch: B bags per feature, output width W.
struct BagsShape {
  int64_t batch_size, width;
};

// The tables: table t is uint8 [R_t, row_bytes(dims[t], bits[t], formats[t])] on `device`,
// with steps[t] fp32 [1] beside it for the per-table-step format; `op` prefixes messages.
inline void check_bags_tables(const char* op, at::TensorList tables, at::TensorList steps,
                              c10::IntArrayRef bits, c10::IntArrayRef dims,
                              c10::IntArrayRef formats, const at::Device& device) {
  const size_t num_tables = tables.size();
  TORCH_CHECK_VALUE(num_tables >= 1, op, "at least one table is needed");
  TORCH_CHECK_VALUE(steps.size() == num_tables && bits.size() == num_tables &&
                        dims.size() == num_tables && formats.size() == num_tables,
                    op, "steps, bits, dims and formats need one entry per table (", num_tables,
                    "), got ", steps.size(), ", ", bits.size(), ", ", dims.size(), ", ",
                    formats.size());
  for (size_t t = 0; t < num_tables; ++t) {
    TORCH_CHECK_VALUE(bits[t] >= 1 && bits[t] <= 8, op, "table ", t, ": bits must be in 1..8, got ",
                      bits[t]);
    TORCH_CHECK_VALUE(dims[t] > 0, op, "table ", t, ": dim must be positive, got ", dims[t]);
    TORCH_CHECK_VALUE(valid_format(formats[t]), op, "table ", t, ": unknown format ",
                      formats[t]);
    const at::Tensor& rows = tables[t];
    TORCH_CHECK_TYPE(rows.scalar_type() == at::kByte, op, "table ", t,
                     " must be uint8 packed rows, got ", rows.scalar_type());
    const int64_t expect = row_bytes(dims[t], bits[t], formats[t]);
    TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(1) == expect, op, "table ", t, " must be [R, ",
                      expect, "] for dim=", dims[t], ", bits=", bits[t], ", format=",
                      formats[t], ", got ", rows.sizes());
    TORCH_CHECK_VALUE(rows.device() == device, op, "table ", t, " is on ", rows.device(),
                      " but the values are on ", device);
    if (formats[t] == SYM_TABLE) {
      TORCH_CHECK_VALUE(steps[t].numel() == 1 && steps[t].scalar_type() == at::kFloat, op,
                        "table ", t, " (per-table step) needs a float32 step of one element");
      TORCH_CHECK_VALUE(steps[t].device() == device, op, "the step of table ", t, " is on ",
                        steps[t].device(), " but the values are on ", device);
    }
  }
}

// The features over tables of widths dims: feature f reads table feature_tables[f], pools by
// poolings[f] (sum, or mean, which takes no per-sample weights) and fills the output columns
// [feature_columns[f], + its table's dim), the blocks side by side from column 0. values
// [N] and offsets [F * B + 1] (key-major) int32/int64, per-sample weights [N] floating
// point, all on one device. Returns B and the output width. The values of offsets and
// values each device checks its own way.
inline BagsShape check_bags_features(const char* op, c10::IntArrayRef dims,
                                     c10::IntArrayRef feature_tables,
                                     c10::IntArrayRef feature_columns,
                                     c10::IntArrayRef poolings, const at::Tensor& values,
                                     const at::Tensor& offsets,
                                     const c10::optional<at::Tensor>& psw) {
  check_index_dtype(values, "values");
  check_index_dtype(offsets, "offsets");
  check_same_device(offsets, "offsets", values, "values");
  const int64_t num_features = static_cast<int64_t>(feature_tables.size());
  const int64_t num_tables = static_cast<int64_t>(dims.size());
  TORCH_CHECK_VALUE(num_features >= 1, op, "at least one feature is needed");
  TORCH_CHECK_VALUE(static_cast<int64_t>(feature_columns.size()) == num_features &&
                        static_cast<int64_t>(poolings.size()) == num_features,
                    op, "feature_columns and poolings need one entry per feature (",
                    num_features, ")");
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (first column, width) per feature
  int64_t width = 0;
  for (int64_t f = 0; f < num_features; ++f) {
    const int64_t t = feature_tables[f];
    TORCH_CHECK_VALUE(t >= 0 && t < num_tables, op, "feature ", f, " reads table ", t,
                      ", but there are ", num_tables, " tables");
    TORCH_CHECK_VALUE(poolings[f] == POOL_SUM || poolings[f] == POOL_MEAN, op, "feature ", f,
                      ": pooling must be 0 (sum) or 1 (mean), got ", poolings[f]);
    TORCH_CHECK_VALUE(!(psw.has_value() && poolings[f] == POOL_MEAN), op,
                      "feature ", f, " pools by mean, which takes no per-sample weights");
    blocks.emplace_back(feature_columns[f], dims[t]);
    width += dims[t];
  }
  std::sort(blocks.begin(), blocks.end());
  for (int64_t k = 0, next = 0; k < num_features; next += blocks[k].second, ++k)
    TORCH_CHECK_VALUE(blocks[k].first == next, op, "feature_columns must place the features' ",
                      "blocks side by side from column 0, but a block starts at column ",
                      blocks[k].first, " where ", next, " was expected");
  TORCH_CHECK_VALUE(offsets.numel() >= 1 && (offsets.numel() - 1) % num_features == 0, op,
                    "offsets must have F * B + 1 entries for F = ", num_features,
                    " features, got ", offsets.numel());
  if (psw.has_value()) {
    TORCH_CHECK_VALUE(psw->dim() == 1 && psw->numel() == values.numel(), op,
                      "per_sample_weights must have one weight per value (", values.numel(),
                      "), got ", psw->sizes());
    TORCH_CHECK_TYPE(is_float_dtype(psw->scalar_type()), op,
                     "per_sample_weights must be floating point, got ", psw->scalar_type());
    check_same_device(*psw, "per_sample_weights", values, "values");
  }
  return {(offsets.numel() - 1) / num_features, width};
}

// embedding_bags' arguments; returns the batch size and the output width.
inline BagsShape check_bags_args(at::TensorList tables, at::TensorList steps,
                                 c10::IntArrayRef bits, c10::IntArrayRef dims,
                                 c10::IntArrayRef formats, c10::IntArrayRef feature_tables,
                                 c10::IntArrayRef feature_columns, c10::IntArrayRef poolings,
                                 const at::Tensor& values, const at::Tensor& offsets,
                                 const c10::optional<at::Tensor>& psw,
                                 at::ScalarType out_dtype) {
  const char* op = "qembed.embedding_bags: ";
  check_output_dtype(out_dtype);
  check_bags_tables(op, tables, steps, bits, dims, formats, values.device());
  return check_bags_features(op, dims, feature_tables, feature_columns, poolings, values,
                             offsets, psw);
}

// The output gradient of a batch of that shape: floating point [B, W] beside values.
inline void check_bags_grad_out(const char* op, const at::Tensor& grad_out,
                                const BagsShape& shape, const at::Tensor& values) {
  TORCH_CHECK_TYPE(at::isFloatingType(grad_out.scalar_type()), op,
                   "grad_out must be floating point, got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == shape.batch_size &&
                        grad_out.size(1) == shape.width,
                    op, "grad_out must be [", shape.batch_size, ", ", shape.width, "], got ",
                    grad_out.sizes());
  check_same_device(grad_out, "grad_out", values, "values");
}

// embedding_bags_backward's arguments: the lookup's features over tables of widths dims, and
// grad_out; returns the batch's shape.
inline BagsShape check_bags_backward_args(const char* op, const at::Tensor& grad_out,
                                          c10::IntArrayRef dims,
                                          c10::IntArrayRef feature_tables,
                                          c10::IntArrayRef feature_columns,
                                          c10::IntArrayRef poolings, const at::Tensor& values,
                                          const at::Tensor& offsets,
                                          const c10::optional<at::Tensor>& psw) {
  const BagsShape shape = check_bags_features(op, dims, feature_tables, feature_columns,
                                              poolings, values, offsets, psw);
  check_bags_grad_out(op, grad_out, shape, values);
  return shape;
}

// embedding_bags_psw_backward's arguments: a lookup pooled by sum, and grad_out; returns the
// batch's shape.
inline BagsShape check_bags_psw_backward_args(const at::Tensor& grad_out, at::TensorList tables,
                                              at::TensorList steps, c10::IntArrayRef bits,
                                              c10::IntArrayRef dims, c10::IntArrayRef formats,
                                              c10::IntArrayRef feature_tables,
                                              c10::IntArrayRef feature_columns,
                                              const at::Tensor& values,
                                              const at::Tensor& offsets) {
  const char* op = "qembed.embedding_bags_psw_backward: ";
  check_bags_tables(op, tables, steps, bits, dims, formats, values.device());
  const std::vector<int64_t> sums(feature_tables.size(), POOL_SUM);
  const BagsShape shape = check_bags_features(op, dims, feature_tables, feature_columns, sums,
                                              values, offsets, c10::nullopt);
  check_bags_grad_out(op, grad_out, shape, values);
  return shape;
}

// Table t's entry of an optional list of key offsets (0 when the list is absent).
inline int64_t key_offset(at::OptionalIntArrayRef offsets, size_t t) {
  return offsets.has_value() ? (*offsets)[t] : 0;
}

// The update of every table (embedding_bags_update, embedding_bags_backward_update): one
// entry per table in every list (the key offsets' lists may be absent: all 0), table t's as
// lowp_update checks them (iteration = counters[t]), every table on table 0's device.
inline void check_bags_update_tables(const char* op, at::TensorList tables, at::TensorList steps,
                                     at::TensorList states, at::TensorList step_states,
                                     c10::IntArrayRef bits, c10::IntArrayRef dims,
                                     c10::IntArrayRef formats, int64_t optimizer,
                                     bool learn_step, int64_t step_optimizer,
                                     c10::IntArrayRef seeds, c10::IntArrayRef counters,
                                     at::OptionalIntArrayRef row_offsets,
                                     at::OptionalIntArrayRef column_offsets) {
  const size_t num_tables = tables.size();
  TORCH_CHECK_VALUE(num_tables >= 1 && steps.size() == num_tables &&
                        states.size() == num_tables && step_states.size() == num_tables &&
                        bits.size() == num_tables && dims.size() == num_tables &&
                        formats.size() == num_tables && seeds.size() == num_tables &&
                        counters.size() == num_tables &&
                        (!row_offsets.has_value() || row_offsets->size() == num_tables) &&
                        (!column_offsets.has_value() || column_offsets->size() == num_tables),
                    op, "at least one table is needed, and every list needs one entry per ",
                    "table (", num_tables, ")");
  for (size_t t = 0; t < num_tables; ++t) {
    const c10::optional<at::Tensor> step =
        formats[t] == SYM_TABLE ? c10::optional<at::Tensor>(steps[t]) : c10::nullopt;
    check_update_table_args(tables[t], step, states[t], step_states[t], bits[t], dims[t],
                            formats[t], optimizer, counters[t], learn_step, step_optimizer,
                            key_offset(row_offsets, t), key_offset(column_offsets, t));
    check_same_device(tables[t], "every table", tables[0], "table 0");
  }
}

// embedding_bags_update's arguments: the tables' (check_bags_update_tables) and table t's
// unique_rows[t] and grads[t] (grad_rows[t] made contiguous) as lowp_update checks them. The
// values of unique_rows (range and order) each device checks its own way.
inline void check_bags_update_args(at::TensorList tables, at::TensorList steps,
                                   at::TensorList states, at::TensorList step_states,
                                   at::TensorList unique_rows, at::TensorList grads,
                                   c10::IntArrayRef bits, c10::IntArrayRef dims,
                                   c10::IntArrayRef formats, int64_t optimizer,
                                   bool learn_step, int64_t step_optimizer,
                                   c10::IntArrayRef seeds, c10::IntArrayRef counters,
                                   at::OptionalIntArrayRef row_offsets,
                                   at::OptionalIntArrayRef column_offsets) {
  const char* op = "qembed.embedding_bags_update: ";
  check_bags_update_tables(op, tables, steps, states, step_states, bits, dims, formats,
                           optimizer, learn_step, step_optimizer, seeds, counters, row_offsets,
                           column_offsets);
  const size_t num_tables = tables.size();
  TORCH_CHECK_VALUE(unique_rows.size() == num_tables && grads.size() == num_tables, op,
                    "at least one table is needed, and every list needs one entry per table (",
                    num_tables, ")");
  for (size_t t = 0; t < num_tables; ++t) {
    check_index_dtype(unique_rows[t], "unique_rows");
    check_same_device(unique_rows[t], "unique_rows", tables[t], "rows");
    check_update_f32(grads[t], "grad_rows", unique_rows[t].numel(), dims[t], tables[t]);
  }
}

// embedding_bags_backward_update's arguments: the lookup's (the tables on values' device)
// with grad_out, and the update's; returns the batch's shape.
inline BagsShape check_bags_backward_update_args(
    const at::Tensor& grad_out, c10::IntArrayRef feature_tables,
    c10::IntArrayRef feature_columns, c10::IntArrayRef poolings, const at::Tensor& values,
    const at::Tensor& offsets, const c10::optional<at::Tensor>& psw, at::TensorList tables,
    at::TensorList steps, at::TensorList states, at::TensorList step_states,
    c10::IntArrayRef bits, c10::IntArrayRef dims, c10::IntArrayRef formats, int64_t optimizer,
    bool learn_step, int64_t step_optimizer, c10::IntArrayRef seeds, c10::IntArrayRef counters,
    at::OptionalIntArrayRef row_offsets, at::OptionalIntArrayRef column_offsets) {
  const char* op = "qembed.embedding_bags_backward_update: ";
  check_bags_tables(op, tables, steps, bits, dims, formats, values.device());
  const BagsShape shape = check_bags_backward_args(op, grad_out, dims, feature_tables,
                                                   feature_columns, poolings, values, offsets,
                                                   psw);
  check_bags_update_tables(op, tables, steps, states, step_states, bits, dims, formats,
                           optimizer, learn_step, step_optimizer, seeds, counters, row_offsets,
                           column_offsets);
  return shape;
}

// embedding_bags' offsets (host memory, num_features * batch + 1 of them): from 0,
// non-decreasing, ending at the number of values; a message names the bag and feature.
inline void check_bags_offsets_values(const char* op, const int64_t* off, int64_t num_offsets,
                                      int64_t batch, int64_t num_values) {
  TORCH_CHECK_VALUE(off[0] == 0, op, "offsets[0] must be 0, got ", off[0]);
  for (int64_t k = 1; k < num_offsets; ++k)
    TORCH_CHECK_VALUE(off[k] >= off[k - 1], op, "offsets must be non-decreasing, but bag ",
                      (k - 1) % batch, " of feature ", (k - 1) / batch, " has offsets ",
                      off[k - 1], " to ", off[k]);
  TORCH_CHECK_VALUE(off[num_offsets - 1] == num_values, op, "offsets end at ",
                    off[num_offsets - 1], " but there are ", num_values,
                    " values (lengths and values disagree)");
}

// Every value (host memory) inside the table its feature reads (num_rows per table); names
// the first that is not.
template <typename index_t>
inline void check_bags_ids_values(const char* op, const index_t* idx, const int64_t* off,
                                  int64_t batch, c10::IntArrayRef feature_tables,
                                  const std::vector<int64_t>& num_rows) {
  for (int64_t f = 0; f < static_cast<int64_t>(feature_tables.size()); ++f) {
    const int64_t t = feature_tables[f], rows = num_rows[t];
    for (int64_t p = off[f * batch]; p < off[(f + 1) * batch]; ++p)
      TORCH_CHECK_INDEX(idx[p] >= 0 && idx[p] < rows, op, "feature ", f, " (table ", t,
                        ") has id ", static_cast<int64_t>(idx[p]), " at position ", p,
                        ", outside its table of ", rows, " rows");
  }
}

inline void check_f32_shape(const at::Tensor& t, const char* op, const char* name,
                            c10::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "qembed.", op, ": ", name,
                   " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, "qembed.", op, ": ", name, " must have shape ", shape,
                    ", got ", t.sizes());
}

// The MPE search's tensors: fp32 weight [R, D], int64 row_group [R], fp32 probs [G, m],
// alpha [m], beta [D], all on weight's device, and m candidate widths in 0..8. The values
// (groups in range, positive steps) each device checks its own way.
inline void check_search_args(const char* op, const at::Tensor& weight,
                              const at::Tensor& row_group, const at::Tensor& probs,
                              const at::Tensor& alpha, const at::Tensor& beta,
                              c10::IntArrayRef bits) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "qembed.", op, ": weight must be 2-D, got ",
                    weight.dim(), "-D");
  const int64_t rows = weight.size(0), dim = weight.size(1);
  const int64_t m = static_cast<int64_t>(bits.size());
  TORCH_CHECK_VALUE(m >= 1, "qembed.", op, ": at least one candidate bit width is needed");
  for (int64_t b : bits)
    TORCH_CHECK_VALUE(b >= 0 && b <= 8, "qembed.", op, ": candidate bit widths must be in ",
                      "0..8, got ", b);
  check_f32_shape(weight, op, "weight", {rows, dim});
  TORCH_CHECK_VALUE(probs.dim() == 2, "qembed.", op, ": probs must be [G, ", m, "]");
  check_f32_shape(probs, op, "probs", {probs.size(0), m});
  check_f32_shape(alpha, op, "alpha", {m});
  check_f32_shape(beta, op, "beta", {dim});
  TORCH_CHECK_TYPE(row_group.scalar_type() == at::kLong, "qembed.", op,
                   ": row_group must be int64, got ", row_group.scalar_type());
  TORCH_CHECK_VALUE(row_group.dim() == 1 && row_group.numel() == rows, "qembed.", op,
                    ": row_group must have one entry per row (", rows, "), got ",
                    row_group.sizes());
  for (const at::Tensor* t : {&row_group, &probs, &alpha, &beta})
    check_same_device(*t, "a quantizer tensor", weight, "weight");
}

// mpe_search_forward's indices and bags (its quantizer: check_search_args); returns the
// number of output rows.
inline int64_t check_search_lookup_args(const at::Tensor& weight, const at::Tensor& indices,
                                        const at::Tensor& offsets, int64_t mode,
                                        bool include_last_offset) {
  check_mode(mode);
  check_index_dtype(indices, "indices");
  check_same_device(indices, "indices", weight, "weight");
  return check_bags(mode, indices.numel(), offsets, include_last_offset, weight, "weight");
}

// mpe_search_backward's rows (its quantizer: check_search_args): unique_rows [U] and their
// gradients fp32 [U, D] beside weight, and the number of values looked up.
inline void check_search_rows_args(const at::Tensor& weight, const at::Tensor& unique_rows,
                                   const at::Tensor& grad_rows, int64_t numel) {
  const char* op = "mpe_search_backward";
  check_index_dtype(unique_rows, "unique_rows");
  check_same_device(unique_rows, "unique_rows", weight, "weight");
  check_same_device(grad_rows, "grad_rows", weight, "weight");
  const int64_t u = unique_rows.numel();
  check_f32_shape(grad_rows, op, "grad_rows", {u, weight.size(1)});
  TORCH_CHECK_VALUE(numel > 0 || u == 0, "qembed.", op, ": numel (values looked up) must be ",
                    "positive, got ", numel);
}

// mpe_embedding_bag's row locations come in two layouts: a row map (int16 or int32 [R]: each
// row's position in the concatenated segments, -1 for a pruned row) or row ranges (int32
// [K + 1, 2]: range k holds rows [ranges[k][0], ranges[k + 1][0]) at consecutive positions
// from ranges[k][1], or pruned if that is -1; the last entry's first column is R, its
// second unused). Ranges cost 8 bytes per run of rows of equal width instead of a map entry
// per row: a table whose ids are numbered by frequency has a few hundred runs at most.
inline bool is_row_ranges(const at::Tensor& location) { return location.dim() == 2; }

// Row ranges (host memory, `num_ranges` + 1 entries) that start at row 0, increase, and put
// each range inside one segment (`segment_ends`: past each segment's last position).
inline void check_row_ranges(const int32_t* ranges, int64_t num_ranges,
                             const std::vector<int64_t>& segment_ends) {
  const char* op = "qembed.mpe_embedding_bag: ";
  // (with no ranges, the table must have no rows: ranges[0] is then R)
  TORCH_CHECK_VALUE(ranges[0] == 0, op, "row ranges must start at row 0, got ", ranges[0]);
  const int64_t total = segment_ends.empty() ? 0 : segment_ends.back();
  for (int64_t k = 0; k < num_ranges; ++k) {
    const int64_t first = ranges[2 * k], next = ranges[2 * k + 2], pos = ranges[2 * k + 1];
    TORCH_CHECK_VALUE(next > first, op, "row ranges must increase, but range ", k + 1,
                      " starts at ", next, " after range ", k, " at ", first);
    if (pos == -1) continue;
    int64_t end = total, seg_start = 0;
    for (const int64_t e : segment_ends) {
      if (pos < e) {
        end = e;
        break;
      }
      seg_start = e;
    }
    TORCH_CHECK_VALUE(pos >= 0 && pos >= seg_start && pos + (next - first) <= end, op,
                      "row range ", k, " (rows ", first, " to ", next - 1, " at position ", pos,
                      ") is outside the segments (", total, " rows) or crosses one's end");
  }
}

// mpe_embedding_bag's arguments: one uint8 segment [n_s, >= code_bytes(D, bits[s])] per bit
// width, fp32 steps [S] and beta [D], a row map or row ranges, all on beta's device, and a
// lookup's indices, offsets, weights, mode and output dtype; returns the number of output
// rows. The values (positive steps, locations inside the segments) each device checks its
// own way.
inline int64_t check_mixed_lookup_args(at::TensorList segments, c10::IntArrayRef bits,
                                       const at::Tensor& steps, const at::Tensor& beta,
                                       const at::Tensor& location, const at::Tensor& indices,
                                       const at::Tensor& offsets,
                                       const c10::optional<at::Tensor>& psw, int64_t mode,
                                       bool include_last_offset, at::ScalarType out_dtype) {
  const char* op = "qembed.mpe_embedding_bag: ";
  check_mode(mode);
  check_output_dtype(out_dtype);
  const int64_t num_segments = static_cast<int64_t>(segments.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(bits.size()) == num_segments, op, "one bit width per ",
                    "segment is needed, got ", bits.size(), " for ", num_segments);
  TORCH_CHECK_TYPE(beta.scalar_type() == at::kFloat && steps.scalar_type() == at::kFloat,
                   op, "steps and beta must be float32");
  TORCH_CHECK_VALUE(beta.dim() == 1 && beta.numel() > 0, op,
                    "beta must be 1-D of the embedding dim, got ", beta.sizes());
  TORCH_CHECK_VALUE(steps.dim() == 1 && steps.numel() == num_segments, op,
                    "steps must have one entry per segment (", num_segments, "), got ",
                    steps.sizes());
  if (is_row_ranges(location)) {
    TORCH_CHECK_TYPE(location.scalar_type() == at::kInt, op, "row ranges must be int32, got ",
                     location.scalar_type());
    TORCH_CHECK_VALUE(location.size(0) >= 1 && location.size(1) == 2, op, "row ranges must be ",
                      "[K + 1, 2], got ", location.sizes());
  } else {
    TORCH_CHECK_TYPE(location.scalar_type() == at::kInt || location.scalar_type() == at::kShort,
                     op, "a row map must be int16 or int32, got ", location.scalar_type());
    TORCH_CHECK_VALUE(location.dim() == 1, op, "location must be a 1-D row map or [K + 1, 2] ",
                      "row ranges, got ", location.sizes());
  }
  check_same_device(location, "location", beta, "beta");
  check_same_device(steps, "steps", beta, "beta");
  const int64_t dim = beta.numel();
  for (int64_t s = 0; s < num_segments; ++s) {
    check_bits_dim(bits[s], dim);
    const at::Tensor& seg = segments[s];
    TORCH_CHECK_TYPE(seg.scalar_type() == at::kByte, op, "segment ", s, " must be uint8");
    TORCH_CHECK_VALUE(seg.dim() == 2 && seg.size(1) >= code_bytes(dim, bits[s]), op, "segment ",
                      s, " must be [rows, >= ", code_bytes(dim, bits[s]), "] bytes for ",
                      bits[s], " bits, got ", seg.sizes());
    check_same_device(seg, "a segment", beta, "beta");
  }
  check_index_dtype(indices, "indices");
  check_same_device(indices, "indices", beta, "beta");
  check_per_sample_weights(psw, mode, indices.numel(), beta, "beta");
  return check_bags(mode, indices.numel(), offsets, include_last_offset, beta, "beta");
}

}  // namespace qembed
