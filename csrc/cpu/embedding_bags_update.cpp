// embedding_bags_update: lowp_update for every table of a batch in one call. Every (table,
// distinct row) is a work item of one parallel loop, so small and large tables share the
// threads; each row is updated by the same function as lowp_update's (update_row.h), with its
// table's width, state, seed and counter, so a table gets the bits lowp_update gives it.
// Tables with a learned per-table step finish with lowp_update's step pass
// (bags_training.h). The op checks its arguments and splits the items over threads; the
// kernels (isa/embedding_bags_update.cpp, isa/lowp_update.cpp) update the rows.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "../padded_rows.h"
#include "bags_training.h"
#include "isa/embedding_bags_update.h"

namespace qembed {
namespace {

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
  std::vector<const int64_t*> rows;
  std::vector<int64_t> counts;
  std::vector<const float*> grad_ptrs;
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
    rows.push_back(uniq);
    counts.push_back(u);
    grad_ptrs.push_back(grads[t].data_ptr<float>());
  }
  const TableUpdates updates = table_updates(
      tables, steps, states, step_states, rows, counts, grad_ptrs, bits, dims, formats,
      optimizer, lr, eps, weight_decay, beta1, beta2, learn_step, step_optimizer, step_lr,
      stochastic, seeds, counters, row_offsets, column_offsets);
  const BagsUpdateArgs args = updates.args();
  at::parallel_for(0, updates.item_start.back(), 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(3 * kRowsTogether * updates.max_dim);
    QEMBED_CPU_KERNEL(embedding_bags_update_rows)(args, begin, end, scratch.data());
  });
  return finish_updates(updates);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("embedding_bags_update", &embedding_bags_update_cpu); }

}  // namespace qembed
