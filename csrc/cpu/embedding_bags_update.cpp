// embedding_bags_update: lowp_update for every table of a batch in one call. Every (table,
// distinct row) is a work item of one parallel loop, so small and large tables share the
// threads; each row is updated by the same function as lowp_update's (update_row.h), with its
// table's width, state, seed and counter, so a table gets the bits lowp_update gives it.
// Tables with a learned per-table step finish with their own step pass.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <vector>
#include "../checks.h"
#include "../optim.h"
#include "../padded_rows.h"
#include "update_row.h"

namespace qembed {
namespace {

constexpr int64_t kPrefetchDistance = 8;

// What one table's share of the update needs.
struct TableUpdate {
  UpdateTable buffers;
  int64_t bits;
  const int64_t* uniq;
  int64_t num_unique;
  const float* grad;
  UpdateConfig config;
  RoundingKey rounding;
  bool deferred;                // a learned per-table step: re-quantized after all rows
  std::vector<float> kept;      // deferred: the rows' updated values [U, padded D]
  std::vector<float> lsq;       // deferred: the rows' LSQ sums
  std::vector<uint8_t> skipped;
};

bool update_one(TableUpdate& t, int64_t k, float* local) {
  const int64_t width = padded_dim(t.config.dim);
  float* w = t.deferred ? t.kept.data() + k * width : local;
  return QEMBED_DISPATCH_BITS(t.bits, [&] {
    return update_table_row<BITS>(t.buffers, t.uniq[k], t.grad + k * width, nullptr, w,
                                  t.deferred ? &t.lsq[k] : nullptr, t.config, t.rounding);
  });
}

at::Tensor embedding_bags_update_cpu(
    at::TensorList tables, at::TensorList steps, at::TensorList states,
    at::TensorList step_states, at::TensorList unique_rows, at::TensorList grad_rows_in,
    c10::IntArrayRef bits, c10::IntArrayRef dims, c10::IntArrayRef formats, int64_t optimizer,
    double lr, double eps, double weight_decay, double beta1, double beta2, bool learn_step,
    int64_t step_optimizer, double step_lr, bool stochastic, c10::IntArrayRef seeds,
    c10::IntArrayRef counters, at::OptionalIntArrayRef row_offsets,
    at::OptionalIntArrayRef column_offsets) {
  const char* op = "qembed.embedding_bags_update: ";
  const size_t num_tables = tables.size();
  std::vector<at::Tensor> grads;
  for (const at::Tensor& g : grad_rows_in) grads.push_back(g.contiguous());
  check_bags_update_args(tables, steps, states, step_states, unique_rows, grads, bits, dims,
                         formats, optimizer, learn_step, step_optimizer, seeds, counters,
                         row_offsets, column_offsets);
  // Rows are updated at their padded width (update_row.h): zero gradient on the pad columns.
  for (at::Tensor& g : grads) g = pad_columns(g).contiguous();
  std::vector<at::Tensor> uniqs;
  std::vector<TableUpdate> work(num_tables);
  std::vector<int64_t> item_start(num_tables + 1, 0);
  int64_t max_dim = 0;
  for (size_t t = 0; t < num_tables; ++t) {
    uniqs.push_back(unique_rows[t].to(at::kLong).contiguous());
    const int64_t u = uniqs[t].numel(), num_rows = tables[t].size(0);
    const int64_t* uniq = uniqs[t].data_ptr<int64_t>();
    for (int64_t k = 0; k < u; ++k) {
      TORCH_CHECK_INDEX(uniq[k] >= 0 && uniq[k] < num_rows, op, "table ", t, ": row ", uniq[k],
                        " is out of range for its ", num_rows, " rows");
      // Distinct rows are what makes the parallel in-place update race-free.
      TORCH_CHECK_VALUE(k == 0 || uniq[k] > uniq[k - 1], op, "table ", t, ": unique_rows must ",
                        "be strictly increasing (as embedding_bags_backward returns them)");
    }
    TableUpdate& w = work[t];
    w.buffers = {tables[t].data_ptr<uint8_t>(), tables[t].size(1),
                 formats[t] == SYM_TABLE ? steps[t].data_ptr<float>() : nullptr,
                 states[t].data_ptr<float>(), step_states[t].data_ptr<float>()};
    w.bits = bits[t];
    w.uniq = uniq;
    w.num_unique = u;
    w.grad = grads[t].data_ptr<float>();
    w.config = make_update_config(dims[t], formats[t], optimizer, lr, eps, weight_decay, beta1,
                                  beta2, counters[t], learn_step, step_optimizer, step_lr);
    w.rounding = {stochastic, static_cast<uint64_t>(seeds[t]),
                  static_cast<uint64_t>(counters[t]), 0,
                  static_cast<uint64_t>(key_offset(row_offsets, t)),
                  key_offset(column_offsets, t)};
    w.deferred = learn_step && formats[t] == SYM_TABLE;
    if (w.deferred) {
      w.kept.resize(u * padded_dim(dims[t]));
      w.lsq.resize(u);
    }
    w.skipped.assign(u, 0);
    item_start[t + 1] = item_start[t] + u;
    max_dim = std::max(max_dim, padded_dim(dims[t]));
  }

  at::parallel_for(0, item_start[num_tables], 16, [&](int64_t begin, int64_t end) {
    std::vector<float> local(max_dim);
    size_t t = std::upper_bound(item_start.begin(), item_start.end(), begin) -
               item_start.begin() - 1;
    for (int64_t i = begin; i < end; ++i) {
      while (i >= item_start[t + 1]) ++t;
      TableUpdate& w = work[t];
      const int64_t k = i - item_start[t];
      // Rows of a large table miss the caches: fetch upcoming rows and their state early.
      if (k + kPrefetchDistance < w.num_unique && i + kPrefetchDistance < end) {
        const int64_t next = w.uniq[k + kPrefetchDistance];
        const int64_t sw = state_width(w.config.optimizer, w.config.dim);
        prefetch_span(w.buffers.rows + next * w.buffers.stride, w.buffers.stride);
        if (sw > 0) prefetch_span(w.buffers.state + next * sw, sw * sizeof(float));
      }
      if (!update_one(w, k, local.data())) w.skipped[k] = 1;
    }
  });

  at::Tensor skipped = at::zeros({static_cast<int64_t>(num_tables)},
                                 at::TensorOptions().dtype(at::kLong));
  int64_t* counts = skipped.data_ptr<int64_t>();
  for (size_t t = 0; t < num_tables; ++t) {
    TableUpdate& w = work[t];
    for (uint8_t x : w.skipped) counts[t] += x;
    if (w.deferred && counts[t] < w.num_unique)
      QEMBED_DISPATCH_BITS(w.bits, [&] {
        finish_table_step<BITS>(w.buffers, w.uniq, w.num_unique, w.kept.data(), w.lsq.data(),
                                w.skipped.data(), counts[t], w.config, w.rounding);
      });
  }
  return skipped;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("embedding_bags_update", &embedding_bags_update_cpu); }

}  // namespace qembed
