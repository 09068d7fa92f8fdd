// mpe_search_forward: the MPE search's lookup on an fp32 table, one warp per output row, one
// lane per column. Each looked-up value becomes sum_b p[g(r), b] * Q_b(w) (candidates in
// order, lsq_plus.h), added over the bag in position order: the CPU kernel's order, so the
// results are equal bit for bit. Rows or groups out of range are skipped without a
// synchronisation; QEMBED_CUDA_VALIDATE=1 waits and raises for them, bad offsets and a
// non-positive alpha, as the CPU does.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include "../checks.h"
#include "../lsq_plus.h"
#include "common.cuh"
#include "launch.cuh"
#include "mpe_search.cuh"

namespace qembed {
namespace {

template <typename index_t>
__global__ void search_forward_kernel(Search q, const index_t* __restrict__ idx, int64_t n,
                                      const int64_t* __restrict__ offsets, int64_t num_offsets,
                                      int64_t num_out, bool mean, int* error,
                                      float* __restrict__ out) {
  const int64_t o = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (o >= num_out) return;
  if (error != nullptr && o == 0 && lane == 0) check_alpha(q, error);
  int64_t start = o, end = o + 1;  // mode none: one position per output row
  if (offsets != nullptr && bag_range(offsets, num_offsets, o, n, start, end) &&
      error != nullptr && lane == 0)
    atomicOr(error, kBadOffsets);
  for (int64_t d = lane; d < q.dim; d += kWarp) {
    float acc = 0.0f;
    for (int64_t p = start; p < end; ++p) {
      const int64_t r = static_cast<int64_t>(idx[p]);
      const float* pr = row_probs(q, r, d == lane ? error : nullptr);
      if (pr == nullptr) continue;
      const float w = q.weight[r * q.dim + d], beta = q.beta[d];
      float value = 0.0f;  // expected_row's order: candidates in turn
      for (int k = 0; k < q.m; ++k) {
        const int b = q.bits[k];
        if (b == 0) continue;
        value = value + pr[k] * lsq_plus_value(w, beta, q.alpha[k], qmin(b), qmax(b));
      }
      acc = offsets == nullptr ? value : acc + value;
    }
    if (mean && end > start) acc /= static_cast<float>(end - start);
    out[o * q.dim + d] = acc;
  }
}

at::Tensor mpe_search_forward_cuda(const at::Tensor& weight, const at::Tensor& indices_in,
                                   const at::Tensor& offsets_in, const at::Tensor& row_group,
                                   const at::Tensor& probs, const at::Tensor& alpha,
                                   const at::Tensor& beta, c10::IntArrayRef bits, int64_t mode,
                                   bool include_last_offset) {
  const SearchTensors t =
      search_tensors("mpe_search_forward", weight, row_group, probs, alpha, beta, bits);
  const int64_t num_out =
      check_search_lookup_args(weight, indices_in, offsets_in, mode, include_last_offset);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = indices.numel(), dim = weight.size(1);
  at::Tensor offsets;
  if (mode != POOL_NONE) offsets = offsets_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty({num_out, dim}, t.weight.options());
  if (num_out == 0 || dim == 0) return out;
  const bool validate = validate_on_host();
  const at::Tensor error =
      validate ? at::zeros({1}, weight.options().dtype(at::kInt)) : at::Tensor();
  const Search q = t.view(bits);
  const int64_t* off = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  const int64_t num_offsets = offsets.defined() ? offsets.numel() : 0;
  int* err = validate ? error.data_ptr<int>() : nullptr;
  const unsigned int blocks = blocks_for(num_out * kWarp);
  if (indices.scalar_type() == at::kInt)
    search_forward_kernel<int32_t><<<blocks, kBlock, 0, current_stream()>>>(
        q, indices.data_ptr<int32_t>(), n, off, num_offsets, num_out, mode == POOL_MEAN, err,
        out.data_ptr<float>());
  else
    search_forward_kernel<int64_t><<<blocks, kBlock, 0, current_stream()>>>(
        q, indices.data_ptr<int64_t>(), n, off, num_offsets, num_out, mode == POOL_MEAN, err,
        out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (validate) {
    const int flags = error.item<int>();
    TORCH_CHECK_INDEX(!(flags & kBadIndex), "qembed.mpe_search_forward: an index is out of ",
                      "range for a table of ", weight.size(0), " rows");
    TORCH_CHECK_INDEX(!(flags & kBadParam), "qembed.mpe_search_forward: a row_group entry is ",
                      "not a group of probs");
    TORCH_CHECK_VALUE(!(flags & kBadAlpha), "qembed.mpe_search_forward: alpha must be ",
                      "positive and finite");
    TORCH_CHECK_VALUE(!(flags & kBadOffsets), "qembed.mpe_search_forward: offsets must start ",
                      "at 0, be non-decreasing and not pass the end of indices (", n, ")");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("mpe_search_forward", &mpe_search_forward_cuda); }

}  // namespace qembed
