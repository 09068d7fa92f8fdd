// lowp_update: one fused low-precision training step for the distinct rows of a batch.
// Each row's codes, step and optimizer state are read once and written once:
//   w = s * q (or the given fp32 weights)      dequantize
//   w -= lr * U(g + wd * w)                     SGD, row-wise Adagrad or Adam, in fp32
//   s -= step_lr * V(g_s)                       ALPT: LSQ step gradient, SGD or Adam, s > 0
//   q = clamp(floor(w / s + u) or round(w / s)) stochastic (Philox keyed by row) or nearest
// The per-row work is update_row.h's. With one step per table (SYM_TABLE) the step gradient
// is summed over all rows in row order before the step moves, so rows are re-quantized in a
// second pass over a [U, D] buffer.
// A row whose gradient (or given weights) is not finite is left untouched and counted.
// Rows are worked on at their padded width (update_row.h): the entry point pads the
// gradient and weights of a dim that is not a multiple of 8 with zero columns. The op checks
// its arguments and splits the rows over threads; the kernels (isa/lowp_update.cpp) update
// them.
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "../optim.h"
#include "../padded_rows.h"
#include "isa/lowp_update.h"

namespace qembed {
namespace {

at::Tensor lowp_update_cpu(at::Tensor& rows, const c10::optional<at::Tensor>& step,
                           at::Tensor& state, at::Tensor& step_state,
                           const at::Tensor& unique_rows, const at::Tensor& grad_rows_in,
                           const c10::optional<at::Tensor>& weights_in,
                           const c10::optional<at::Tensor>& weights_out, int64_t bits,
                           int64_t dim, int64_t fmt, int64_t optimizer, double lr, double eps,
                           double weight_decay, double beta1, double beta2, int64_t iteration,
                           bool learn_step, int64_t step_optimizer, double step_lr,
                           bool stochastic, int64_t seed, int64_t counter, int64_t row_offset,
                           int64_t column_offset) {
  check_update_args(rows, step, state, step_state, unique_rows, grad_rows_in.contiguous(),
                    weights_in, weights_out, bits, dim, fmt, optimizer, iteration, learn_step,
                    step_optimizer, row_offset, column_offset);
  const int64_t width = padded_dim(dim);
  const at::Tensor grad = pad_columns(grad_rows_in).contiguous();
  at::Tensor weights_padded, weights_out_padded;
  if (weights_in.has_value()) weights_padded = pad_columns(*weights_in).contiguous();
  if (weights_out.has_value())
    weights_out_padded = width == dim ? *weights_out : pad_columns(*weights_out);
  const int64_t num_rows = rows.size(0);
  const at::Tensor uniq_t = unique_rows.to(at::kLong).contiguous();
  const int64_t u = uniq_t.numel();
  const int64_t* uniq = uniq_t.data_ptr<int64_t>();
  for (int64_t k = 0; k < u; ++k) {
    TORCH_CHECK_INDEX(uniq[k] >= 0 && uniq[k] < num_rows, "qembed.lowp_update: row ", uniq[k],
                      " is out of range for a table of ", num_rows, " rows");
    // Distinct rows are what makes the parallel in-place update race-free.
    TORCH_CHECK_VALUE(k == 0 || uniq[k] > uniq[k - 1], "qembed.lowp_update: unique_rows must ",
                      "be strictly increasing (as embedding_bag_backward returns them)");
  }
  const UpdateConfig c = make_update_config(dim, fmt, optimizer, lr, eps, weight_decay, beta1,
                                            beta2, iteration, learn_step, step_optimizer,
                                            step_lr);
  const bool deferred = learn_step && fmt != SYM_ROW;
  std::vector<float> buffer(deferred && !weights_out ? u * width : 0);
  std::vector<float> lsq(deferred ? u : 0);
  std::vector<uint8_t> skipped(u, 0);
  float* kept = weights_out ? weights_out_padded.data_ptr<float>()
                            : (deferred ? buffer.data() : nullptr);
  const UpdateArgs args{{rows.data_ptr<uint8_t>(), rows.size(1),
                         fmt == SYM_TABLE ? step->data_ptr<float>() : nullptr,
                         state.data_ptr<float>(), step_state.data_ptr<float>()},
                        bits, uniq, u, grad.data_ptr<float>(),
                        weights_in.has_value() ? weights_padded.data_ptr<float>() : nullptr,
                        kept, weights_out.has_value(), deferred ? lsq.data() : nullptr,
                        skipped.data(), c,
                        RoundingKey{stochastic, static_cast<uint64_t>(seed),
                                    static_cast<uint64_t>(counter), 0,
                                    static_cast<uint64_t>(row_offset), column_offset}};
  at::parallel_for(0, u, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(3 * width * kRowsTogether);
    QEMBED_CPU_KERNEL(lowp_update_rows)(args, begin, end, scratch.data());
  });
  int64_t num_skipped = 0;
  for (uint8_t x : skipped) num_skipped += x;
  if (deferred && num_skipped < u) {
    const float s = QEMBED_CPU_KERNEL(lowp_update_table_step)(args, num_skipped);
    at::parallel_for(0, u, 16, [&](int64_t begin, int64_t end) {
      QEMBED_CPU_KERNEL(lowp_update_encode)(args, begin, end, s);
    });
  }
  if (weights_out.has_value() && !weights_out_padded.is_same(*weights_out))
    weights_out->copy_(weights_out_padded.narrow(1, 0, dim));
  return at::scalar_tensor(num_skipped, rows.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("lowp_update", &lowp_update_cpu); }

}  // namespace qembed
