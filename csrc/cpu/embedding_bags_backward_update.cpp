// embedding_bags_backward_update: embedding_bags_backward and embedding_bags_update in one
// pass. Each work item (a table's distinct row) sums the row's gradient into scratch, as the
// backward sums it, and updates the row at once, as the update does: the row gradients are
// never stored and read back, and the output-gradient rows a row needs are fetched while
// earlier rows are being updated. A table gets the bits the two ops give it.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "bags_training.h"
#include "isa/embedding_bags_backward_update.h"

namespace qembed {
namespace {

at::Tensor embedding_bags_backward_update_cpu(
    const at::Tensor& grad_out_in, c10::IntArrayRef feature_tables,
    c10::IntArrayRef feature_columns, c10::IntArrayRef poolings, const at::Tensor& values_in,
    const at::Tensor& offsets_in, const c10::optional<at::Tensor>& psw_in,
    at::TensorList tables, at::TensorList steps, at::TensorList states,
    at::TensorList step_states, c10::IntArrayRef bits, c10::IntArrayRef dims,
    c10::IntArrayRef formats, int64_t optimizer, double lr, double eps, double weight_decay,
    double beta1, double beta2, bool learn_step, int64_t step_optimizer, double step_lr,
    bool stochastic, c10::IntArrayRef seeds, c10::IntArrayRef counters,
    at::OptionalIntArrayRef row_offsets, at::OptionalIntArrayRef column_offsets) {
  const char* op = "qembed.embedding_bags_backward_update: ";
  const BagsShape shape = check_bags_backward_update_args(
      grad_out_in, feature_tables, feature_columns, poolings, values_in, offsets_in, psw_in,
      tables, steps, states, step_states, bits, dims, formats, optimizer, learn_step,
      step_optimizer, seeds, counters, row_offsets, column_offsets);
  const at::Tensor grad_out = grad_out_in.to(at::kFloat).contiguous();
  std::vector<int64_t> num_rows;
  for (const at::Tensor& t : tables) num_rows.push_back(t.size(0));
  const RowRuns runs = row_runs(op, static_cast<int64_t>(tables.size()), shape, feature_tables,
                                feature_columns, poolings, values_in, offsets_in, psw_in,
                                &num_rows);

  const std::vector<const float*> no_grads(tables.size(), nullptr);
  const TableUpdates updates = table_updates(
      tables, steps, states, step_states, runs.rows_ptr, runs.num_rows, no_grads, bits, dims,
      formats, optimizer, lr, eps, weight_decay, beta1, beta2, learn_step, step_optimizer,
      step_lr, stochastic, seeds, counters, row_offsets, column_offsets);
  const BagsBackwardArgs grad_args = runs.args(grad_out, dims, nullptr);
  const BagsUpdateArgs update_args = updates.args();
  // A distinct row's update costs about as much as summing a few gradient rows.
  parallel_over_runs(runs, 3, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(4 * kRowsTogether * updates.max_dim);
    QEMBED_CPU_KERNEL(embedding_bags_backward_update_rows)(grad_args, update_args, begin, end,
                                                           scratch.data());
  });
  return finish_updates(updates);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) {
  m.impl("embedding_bags_backward_update", &embedding_bags_backward_update_cpu);
}

}  // namespace qembed
