// embedding_bags_psw_backward on CUDA, composed of the single-table one: each feature's
// values, its columns of grad_out and its table go through embedding_bag_psw_backward.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <vector>
#include "../checks.h"
#include "launch.cuh"

namespace qembed {
namespace {

at::Tensor single_table_psw_backward(const at::Tensor& grad, const at::Tensor& rows,
                                     const at::Tensor& indices, const at::Tensor& offsets,
                                     const c10::optional<at::Tensor>& step, int64_t bits,
                                     int64_t dim, int64_t fmt) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qembed::embedding_bag_psw_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&,
                                               const c10::optional<at::Tensor>&, int64_t,
                                               int64_t, int64_t, int64_t, bool, int64_t)>();
  return op.call(grad, rows, indices, offsets, step, bits, dim, fmt, POOL_SUM, true, -1);
}

at::Tensor embedding_bags_psw_backward_cuda(
    const at::Tensor& grad_out, at::TensorList tables, at::TensorList steps,
    c10::IntArrayRef bits, c10::IntArrayRef dims, c10::IntArrayRef formats,
    c10::IntArrayRef feature_tables, c10::IntArrayRef feature_columns, const at::Tensor& values,
    const at::Tensor& offsets_in) {
  const BagsShape shape = check_bags_psw_backward_args(grad_out, tables, steps, bits, dims,
                                                       formats, feature_tables, feature_columns,
                                                       values, offsets_in);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t batch = shape.batch_size;
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const at::Tensor bounds = offsets.cpu();
  const int64_t* off = bounds.data_ptr<int64_t>();
  check_bags_offsets_values("qembed.embedding_bags_psw_backward: ", off, bounds.numel(),
                            std::max<int64_t>(batch, 1), values.numel());
  at::Tensor out = at::zeros({values.numel()}, grad_out.options().dtype(at::kFloat));
  for (int64_t f = 0; f < static_cast<int64_t>(feature_tables.size()); ++f) {
    const int64_t t = feature_tables[f], s = off[f * batch], e = off[(f + 1) * batch];
    const c10::optional<at::Tensor> step =
        formats[t] == SYM_TABLE ? c10::optional<at::Tensor>(steps[t]) : c10::nullopt;
    out.slice(0, s, e).copy_(single_table_psw_backward(
        grad_out.slice(1, feature_columns[f], feature_columns[f] + dims[t]).contiguous(),
        tables[t], values.slice(0, s, e), offsets.slice(0, f * batch, (f + 1) * batch + 1) - s,
        step, bits[t], dims[t], formats[t]));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) {
  m.impl("embedding_bags_psw_backward", &embedding_bags_psw_backward_cuda);
}

}  // namespace qembed
