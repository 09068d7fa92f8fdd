// mpe_search_forward: the MPE search's lookup. Each looked-up fp32 row is replaced by its
// expected quantized value over the candidate widths, sum_b p[g(r), b] * Q_b(w_r), computed
// in registers from the row (no quantized copy of the table), then pooled.
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

  if (mode == POOL_NONE) {
    at::Tensor out = at::empty({n, dim}, weight.options());
    float* o = out.data_ptr<float>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        expected_row(w + idx[p] * dim, q, q.probs_of(idx[p]), o + p * dim);
    });
    return out;
  }
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t num_bags = num_out;
  const std::vector<int64_t> starts =
      bag_bounds(offsets.data_ptr<int64_t>(), offsets.numel(), num_bags, n);
  at::Tensor out = at::empty({num_bags, dim}, weight.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, num_bags, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> value(dim);
    for (int64_t b = begin; b < end; ++b) {
      float* acc = o + b * dim;
      std::fill(acc, acc + dim, 0.0f);
      for (int64_t p = starts[b]; p < starts[b + 1]; ++p) {
        expected_row(w + idx[p] * dim, q, q.probs_of(idx[p]), value.data());
        for (int64_t d = 0; d < dim; ++d) acc[d] += value[d];
      }
      const int64_t len = starts[b + 1] - starts[b];
      if (mode == POOL_MEAN && len > 0)
        for (int64_t d = 0; d < dim; ++d) acc[d] /= static_cast<float>(len);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("mpe_search_forward", &mpe_search_forward_cpu); }

}  // namespace qembed
