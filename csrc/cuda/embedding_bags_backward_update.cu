// embedding_bags_backward_update on CUDA, composed of the two ops it fuses on the CPU:
// embedding_bags_backward's row gradients, then embedding_bags_update on them, launched one
// after the other on the stream.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <tuple>
#include <vector>
#include "../checks.h"
#include "launch.cuh"

namespace qembed {
namespace {

using BackwardFn = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
    const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);
using UpdateFn = at::Tensor(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                            at::TensorList, at::TensorList, c10::IntArrayRef, c10::IntArrayRef,
                            c10::IntArrayRef, int64_t, double, double, double, double, double,
                            bool, int64_t, double, bool, c10::IntArrayRef, c10::IntArrayRef,
                            at::OptionalIntArrayRef, at::OptionalIntArrayRef);

at::Tensor embedding_bags_backward_update_cuda(
    const at::Tensor& grad_out, c10::IntArrayRef feature_tables,
    c10::IntArrayRef feature_columns, c10::IntArrayRef poolings, const at::Tensor& values,
    const at::Tensor& offsets, const c10::optional<at::Tensor>& psw, at::TensorList tables,
    at::TensorList steps, at::TensorList states, at::TensorList step_states,
    c10::IntArrayRef bits, c10::IntArrayRef dims, c10::IntArrayRef formats, int64_t optimizer,
    double lr, double eps, double weight_decay, double beta1, double beta2, bool learn_step,
    int64_t step_optimizer, double step_lr, bool stochastic, c10::IntArrayRef seeds,
    c10::IntArrayRef counters, at::OptionalIntArrayRef row_offsets,
    at::OptionalIntArrayRef column_offsets) {
  check_bags_backward_update_args(grad_out, feature_tables, feature_columns, poolings, values,
                                  offsets, psw, tables, steps, states, step_states, bits, dims,
                                  formats, optimizer, learn_step, step_optimizer, seeds,
                                  counters, row_offsets, column_offsets);
  static const auto backward = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("qembed::embedding_bags_backward", "")
                                   .typed<BackwardFn>();
  static const auto update = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("qembed::embedding_bags_update", "")
                                 .typed<UpdateFn>();
  const auto [rows, grads] = backward.call(grad_out, dims, feature_tables, feature_columns,
                                           poolings, values, offsets, psw);
  return update.call(tables, steps, states, step_states, rows, grads, bits, dims, formats,
                     optimizer, lr, eps, weight_decay, beta1, beta2, learn_step, step_optimizer,
                     step_lr, stochastic, seeds, counters, row_offsets, column_offsets);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) {
  m.impl("embedding_bags_backward_update", &embedding_bags_backward_update_cuda);
}

}  // namespace qembed
