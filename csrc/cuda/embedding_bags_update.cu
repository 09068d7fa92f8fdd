// embedding_bags_update on CUDA, composed of the single-table update: lowp_update on each
// table with its own state, seed, counter (iteration = counter) and key offsets, launched
// one after another on the stream; the skipped-row counts stay on the device.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "launch.cuh"

namespace qembed {
namespace {

using UpdateFn = at::Tensor(at::Tensor&, const c10::optional<at::Tensor>&, at::Tensor&,
                            at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                            int64_t, int64_t, int64_t, int64_t, double, double, double, double,
                            double, int64_t, bool, int64_t, double, bool, int64_t, int64_t,
                            int64_t, int64_t);

at::Tensor embedding_bags_update_cuda(
    at::TensorList tables, at::TensorList steps, at::TensorList states,
    at::TensorList step_states, at::TensorList unique_rows, at::TensorList grad_rows,
    c10::IntArrayRef bits, c10::IntArrayRef dims, c10::IntArrayRef formats, int64_t optimizer,
    double lr, double eps, double weight_decay, double beta1, double beta2, bool learn_step,
    int64_t step_optimizer, double step_lr, bool stochastic, c10::IntArrayRef seeds,
    c10::IntArrayRef counters, at::OptionalIntArrayRef row_offsets,
    at::OptionalIntArrayRef column_offsets) {
  const size_t num_tables = tables.size();
  std::vector<at::Tensor> grads;
  for (const at::Tensor& g : grad_rows) grads.push_back(g.contiguous());
  check_bags_update_args(tables, steps, states, step_states, unique_rows, grads, bits, dims,
                         formats, optimizer, learn_step, step_optimizer, seeds, counters,
                         row_offsets, column_offsets);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qembed::lowp_update", "")
                             .typed<UpdateFn>();
  std::vector<at::Tensor> skipped;
  for (size_t t = 0; t < num_tables; ++t) {
    at::Tensor rows = tables[t], state = states[t], step_state = step_states[t];
    const c10::optional<at::Tensor> step =
        formats[t] == SYM_TABLE ? c10::optional<at::Tensor>(steps[t]) : c10::nullopt;
    skipped.push_back(op.call(rows, step, state, step_state, unique_rows[t], grads[t],
                              c10::nullopt, c10::nullopt, bits[t], dims[t], formats[t],
                              optimizer, lr, eps, weight_decay, beta1, beta2, counters[t],
                              learn_step, step_optimizer, step_lr, stochastic, seeds[t],
                              counters[t], key_offset(row_offsets, t),
                              key_offset(column_offsets, t)));
  }
  return at::stack(skipped);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) {
  m.impl("embedding_bags_update", &embedding_bags_update_cuda);
}

}  // namespace qembed
