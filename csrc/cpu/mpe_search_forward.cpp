// mpe_search_forward: the MPE search's lookup. Each looked-up fp32 row is replaced by its
// expected quantized value over the candidate widths, sum_b p[g(r), b] * Q_b(w_r), computed
// in registers from the row (no quantized copy of the table), then pooled. The op checks its
// arguments and splits the work over threads; the kernel (isa/mpe_search_forward.cpp)
// computes.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "bags.h"
#include "mpe.h"

namespace qembed {
namespace {

at::Tensor mpe_search_forward_cpu(const at::Tensor& weight_in, const at::Tensor& indices_in,
                                  const at::Tensor& offsets_in, const at::Tensor& row_group_in,
                                  const at::Tensor& probs_in, const at::Tensor& alpha_in,
                                  const at::Tensor& beta_in, c10::IntArrayRef bits, int64_t mode,
                                  bool include_last_offset) {
  const at::Tensor weight = weight_in.contiguous(), row_group = row_group_in.contiguous();
  const at::Tensor probs = probs_in.contiguous(), alpha = alpha_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  const SearchQuantizer q =
      search_quantizer("mpe_search_forward", weight, row_group, probs, alpha, beta, bits);
  const int64_t num_out =
      check_search_lookup_args(weight, indices_in, offsets_in, mode, include_last_offset);
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t n = indices.numel(), dim = q.dim;
  const int64_t* idx = indices.data_ptr<int64_t>();
  check_indices_in_range(idx, n, weight.size(0));
  const float* w = weight.data_ptr<float>();
  SearchForwardArgs args{q, w, idx, nullptr, mode == POOL_MEAN, nullptr};
  auto run = [&](int64_t count, int64_t grain) {
    at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(dim);
      QEMBED_CPU_KERNEL(mpe_search_forward_rows)(args, begin, end, scratch.data());
    });
  };
  if (mode == POOL_NONE) {
    at::Tensor out = at::empty({n, dim}, weight.options());
    args.out = out.data_ptr<float>();
    run(n, 64);
    return out;
  }
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t num_bags = num_out;
  const std::vector<int64_t> starts =
      bag_bounds(offsets.data_ptr<int64_t>(), offsets.numel(), num_bags, n);
  at::Tensor out = at::empty({num_bags, dim}, weight.options());
  args.starts = starts.data();
  args.out = out.data_ptr<float>();
  run(num_bags, 16);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("mpe_search_forward", &mpe_search_forward_cpu); }

}  // namespace qembed
