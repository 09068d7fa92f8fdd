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
  TORCH_CHECK_VALUE(num_tables >= 1 && steps.size() == num_tables &&
                        states.size() == num_tables && step_states.size() == num_tables &&
                        unique_rows.size() == num_tables && grad_rows.size() == num_tables &&
                        bits.size() == num_tables && dims.size() == num_tables &&
                        formats.size() == num_tables && seeds.size() == num_tables &&
                        counters.size() == num_tables &&
                        (!row_offsets.has_value() || row_offsets->size() == num_tables) &&
                        (!column_offsets.has_value() || column_offsets->size() == num_tables),
                    "qembed.embedding_bags_update: every list needs one entry per table (",
                    num_tables, ")");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qembed::lowp_update", "")
                             .typed<UpdateFn>();
  std::vector<at::Tensor> skipped;
  for (size_t t = 0; t < num_tables; ++t) {
    check_same_device(tables[t], "every table", tables[0], "table 0");
    at::Tensor rows = tables[t], state = states[t], step_state = step_states[t];
    const c10::optional<at::Tensor> step =
        formats[t] == SYM_TABLE ? c10::optional<at::Tensor>(steps[t]) : c10::nullopt;
    skipped.push_back(op.call(rows, step, state, step_state, unique_rows[t], grad_rows[t],
                              c10::nullopt, c10::nullopt, bits[t], dims[t], formats[t],
                              optimizer, lr, eps, weight_decay, beta1, beta2, counters[t],
                              learn_step, step_optimizer, step_lr, stochastic, seeds[t],
                              counters[t], row_offsets.has_value() ? (*row_offsets)[t] : 0,
                              column_offsets.has_value() ? (*column_offsets)[t] : 0));
  }
  return at::stack(skipped);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) {
  m.impl("embedding_bags_update", &embedding_bags_update_cuda);
}

}  // namespace qembed
