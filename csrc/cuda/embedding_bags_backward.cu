// embedding_bags_backward on CUDA, composed of the single-table backward: for each table, its
// features' gradient columns, ids and per-position factors (the weight, 1 / bag length for
// mean, or 1) are put end to end and embedding_bag_backward (sort-based, deterministic)
// sums them as one weighted bag list, repeats in the order of values, as the CPU does.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/repeat_interleave.h>
#include <torch/library.h>
#include <algorithm>
#include <tuple>
#include <vector>
#include "../checks.h"
#include "launch.cuh"

namespace qembed {
namespace {

std::tuple<at::Tensor, at::Tensor> single_table_backward(const at::Tensor& grad,
                                                         const at::Tensor& indices,
                                                         const at::Tensor& offsets,
                                                         const c10::optional<at::Tensor>& psw) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qembed::embedding_bag_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const c10::optional<at::Tensor>&, int64_t, bool, int64_t)>();
  return op.call(grad, indices, offsets, psw, POOL_SUM, true, -1);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> embedding_bags_backward_cuda(
    const at::Tensor& grad_out_in, c10::IntArrayRef dims, c10::IntArrayRef feature_tables,
    c10::IntArrayRef feature_columns, c10::IntArrayRef poolings, const at::Tensor& values,
    const at::Tensor& offsets_in, const c10::optional<at::Tensor>& psw) {
  const char* op = "qembed.embedding_bags_backward: ";
  const BagsShape shape = check_bags_backward_args(op, grad_out_in, dims, feature_tables,
                                                   feature_columns, poolings, values,
                                                   offsets_in, psw);
  const int64_t batch = shape.batch_size;
  const int64_t num_features = static_cast<int64_t>(feature_tables.size());
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.to(at::kFloat);
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const at::Tensor bounds = offsets.cpu();  // where each feature's values start and end
  const int64_t* off = bounds.data_ptr<int64_t>();
  check_bags_offsets_values(op, off, bounds.numel(), std::max<int64_t>(batch, 1),
                            values.numel());
  const at::Tensor lengths = offsets.slice(0, 1) - offsets.slice(0, 0, -1);
  std::vector<at::Tensor> rows, grads;
  for (int64_t t = 0; t < static_cast<int64_t>(dims.size()); ++t) {
    std::vector<at::Tensor> ids, cols, factors, starts;
    int64_t base = 0;
    for (int64_t f = 0; f < num_features; ++f) {
      if (feature_tables[f] != t) continue;
      const int64_t s = off[f * batch], e = off[(f + 1) * batch];
      ids.push_back(values.slice(0, s, e));
      cols.push_back(grad_out.slice(1, feature_columns[f], feature_columns[f] + dims[t]));
      starts.push_back(offsets.slice(0, f * batch, (f + 1) * batch) - (s - base));
      const at::Tensor len = lengths.slice(0, f * batch, (f + 1) * batch);
      if (psw.has_value())
        factors.push_back(psw->slice(0, s, e).to(at::kFloat));
      else if (poolings[f] == POOL_MEAN)
        factors.push_back(at::repeat_interleave(1.0f / len.clamp_min(1).to(at::kFloat), len,
                                                /*dim=*/0, /*output_size=*/e - s));
      else
        factors.push_back(at::ones({e - s}, grad_out.options()));
      base += e - s;
    }
    if (ids.empty()) {
      rows.push_back(at::empty({0}, values.options().dtype(at::kLong)));
      grads.push_back(at::empty({0, dims[t]}, grad_out.options()));
      continue;
    }
    starts.push_back(at::full({1}, base, offsets.options()));
    auto [r, g] = single_table_backward(at::cat(cols, 0), at::cat(ids), at::cat(starts),
                                        at::cat(factors));
    rows.push_back(r);
    grads.push_back(g);
  }
  return {rows, grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) {
  m.impl("embedding_bags_backward", &embedding_bags_backward_cuda);
}

}  // namespace qembed
