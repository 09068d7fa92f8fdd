// lowp_update: one fused low-precision training step for the distinct rows of a batch.
// Each row's codes, step and optimizer state are read once and written once:
//   w = s * q (or the given fp32 weights)      dequantize
//   w -= lr * U(g + wd * w)                     SGD, row-wise Adagrad or Adam, in fp32
//   s -= step_lr * V(g_s)                       ALPT: LSQ step gradient, SGD or Adam, s > 0
//   q = clamp(floor(w / s + u) or round(w / s)) stochastic (Philox keyed by row) or nearest
// With one step per table (SYM_TABLE) the step gradient is summed over all rows in row order
// before the step moves, so rows are re-quantized in a second pass over a [U, D] buffer.
// A row whose gradient (or given weights) is not finite is left untouched and counted.
// Rows are processed at their padded width (padded_rows.h); the optimizer, its state and the
// sums over a row (Adagrad's mean, LSQ's gradient and its scale) cover the D real columns,
// and the pad columns are written as the code of zero.
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#include "../checks.h"
#include "../optim.h"
#include "../padded_rows.h"
#include "row_codec.h"

namespace qembed {
namespace {

constexpr int64_t kPrefetchDistance = 8;

// Always inlined, as RowPrefetch (bags.h): out of line, GCC drops its calls.
QEMBED_INLINE void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 1, 1);
  __builtin_prefetch(c + bytes - 1, 1, 1);
}

bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

// Sum of x[0..n) strictly left to right (the reference's order).
float ordered_sum(const float* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i];
  return acc;
}

// w <- w - lr * U(g + wd * w) on the row's dim real columns; st is the row's optimizer
// state, tmp has dim floats.
// Element-wise work sits in loops of its own so that they vectorize; only the ordered
// sums stay serial.
void optimizer_row(float* w, const float* g, float* st, float* tmp, const UpdateConfig& c) {
  const int64_t dim = c.dim;
  if (c.optimizer == OPT_SGD) {
    for (int64_t d = 0; d < dim; ++d) w[d] = sgd_value(w[d], g[d], c);
  } else if (c.optimizer == OPT_ADAGRAD) {
    for (int64_t d = 0; d < dim; ++d) {
      const float gd = decayed_grad(w[d], g[d], c);
      tmp[d] = gd * gd;
    }
    st[0] = st[0] + ordered_sum(tmp, dim) / static_cast<float>(dim);
    const float denom = adagrad_denom(st[0], c);
    for (int64_t d = 0; d < dim; ++d) w[d] = adagrad_value(w[d], g[d], denom, c);
  } else if (c.optimizer == OPT_ADAM) {
    float* m = st;
    float* v = st + dim;
    for (int64_t d = 0; d < dim; ++d) w[d] = adam_value(w[d], g[d], m[d], v[d], c);
  }
}

// LSQ: sum_d g_d * dQ/ds (optim.h's lsq_term), in row order.
float lsq_sum(const float* w, const float* g, int64_t dim, float s, int32_t qn, int32_t qp,
              float* tmp) {
  for (int64_t d = 0; d < dim; ++d) tmp[d] = lsq_term(w[d], g[d], s, qn, qp);
  return ordered_sum(tmp, dim);
}

template <int BITS>
int64_t update_rows(uint8_t* table, int64_t stride, float* table_step, float* state,
                    float* step_state, const int64_t* uniq, int64_t num_unique,
                    const float* grad, const float* weights, float* weights_out,
                    const UpdateConfig& c, const RoundingKey& rounding) {
  const int64_t dim = c.dim, width = padded_dim(dim), po = param_offset(dim, BITS);
  const int64_t sw = state_width(c.optimizer, dim), ssw = c.step_optimizer == STEP_ADAM ? 2 : 0;
  const int32_t qn = qmin(BITS), qp = qmax(BITS);
  const bool per_row = c.fmt == SYM_ROW;
  const bool deferred = c.learn_step && !per_row;
  // grad, weights and weights_out are [num_unique, width] (the entry point pads them)
  std::vector<float> buffer(deferred && !weights_out ? num_unique * width : 0);
  float* kept = weights_out ? weights_out : buffer.data();
  std::vector<float> lsq(deferred ? num_unique : 0);
  std::vector<uint8_t> skipped(num_unique, 0);
  const float row_gscale = lsq_scale(qp, dim);

  auto encode = [&](const float* w, int64_t r, float s) {
    RoundingKey key = rounding;
    key.row_key = static_cast<uint64_t>(r);
    encode_row<BITS>(w, width, RowParams{s, 0.0f, qn}, key, table + r * stride);
  };

  at::parallel_for(0, num_unique, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> local(width), tmp(dim);
    for (int64_t k = begin; k < end; ++k) {
      // Rows of a large table miss the caches: fetch upcoming rows and their state early.
      if (k + kPrefetchDistance < end) {
        const int64_t next = uniq[k + kPrefetchDistance];
        prefetch_span(table + next * stride, stride);
        if (sw > 0) prefetch_span(state + next * sw, sw * sizeof(float));
      }
      const float* g = grad + k * width;
      float* w = (weights_out || deferred) ? kept + k * width : local.data();
      if (!all_finite(g, dim) || (weights && !all_finite(weights + k * width, dim))) {
        skipped[k] = 1;
        if (weights_out) std::fill(w, w + width, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      const int64_t r = uniq[k];
      uint8_t* row = table + r * stride;
      float s = per_row ? read_f32(row + po) : *table_step;
      if (weights) {
        std::copy(weights + k * width, weights + (k + 1) * width, w);
      } else {
        std::fill(w, w + width, 0.0f);
        accumulate_row<BITS>(row, width, s, 0.0f, qn, w);
      }
      std::fill(w + dim, w + width, 0.0f);  // the pad encodes as zero, whatever it held
      optimizer_row(w, g, state + r * sw, tmp.data(), c);
      if (c.learn_step) {
        const float gs = lsq_sum(w, g, dim, s, qn, qp, tmp.data());
        if (deferred) {
          lsq[k] = gs;
          continue;
        }
        s = next_step(s, row_gscale * gs, step_state + r * ssw, c);
        write_f32(row + po, s);
      }
      encode(w, r, s);
    }
  });

  int64_t num_skipped = 0;
  for (uint8_t x : skipped) num_skipped += x;
  if (deferred && num_skipped < num_unique) {
    float gs = 0.0f;
    for (int64_t k = 0; k < num_unique; ++k)
      if (!skipped[k]) gs += lsq[k];
    const float s = next_step(*table_step, lsq_scale(qp, (num_unique - num_skipped) * dim) * gs,
                              step_state, c);
    *table_step = s;
    at::parallel_for(0, num_unique, 16, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        if (!skipped[k]) encode(kept + k * width, uniq[k], s);
    });
  }
  return num_skipped;
}

at::Tensor lowp_update_cpu(at::Tensor& rows, const c10::optional<at::Tensor>& step,
                           at::Tensor& state, at::Tensor& step_state,
                           const at::Tensor& unique_rows, const at::Tensor& grad_rows_in,
                           const c10::optional<at::Tensor>& weights_in,
                           const c10::optional<at::Tensor>& weights_out, int64_t bits,
                           int64_t dim, int64_t fmt, int64_t optimizer, double lr, double eps,
                           double weight_decay, double beta1, double beta2, int64_t iteration,
                           bool learn_step, int64_t step_optimizer, double step_lr,
                           bool stochastic, int64_t seed, int64_t counter) {
  check_update_args(rows, step, state, step_state, unique_rows, grad_rows_in.contiguous(),
                    weights_in, weights_out, bits, dim, fmt, optimizer, iteration, learn_step,
                    step_optimizer);
  const at::Tensor grad = pad_columns(grad_rows_in).contiguous();
  at::Tensor weights_padded, weights_out_padded;
  if (weights_in.has_value()) weights_padded = pad_columns(*weights_in).contiguous();
  if (weights_out.has_value())
    weights_out_padded = padded_dim(dim) == dim ? *weights_out : pad_columns(*weights_out);
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
  const RoundingKey rounding{stochastic, static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(counter), 0};
  const int64_t skipped = QEMBED_DISPATCH_BITS(bits, [&] {
    return update_rows<BITS>(rows.data_ptr<uint8_t>(), rows.size(1),
                             fmt == SYM_TABLE ? step->data_ptr<float>() : nullptr,
                             state.data_ptr<float>(), step_state.data_ptr<float>(), uniq, u,
                             grad.data_ptr<float>(),
                             weights_in.has_value() ? weights_padded.data_ptr<float>() : nullptr,
                             weights_out.has_value() ? weights_out_padded.data_ptr<float>()
                                                     : nullptr,
                             c, rounding);
  });
  if (weights_out.has_value() && !weights_out_padded.is_same(*weights_out))
    weights_out->copy_(weights_out_padded.narrow(1, 0, dim));
  return at::scalar_tensor(skipped, rows.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("lowp_update", &lowp_update_cpu); }

}  // namespace qembed
