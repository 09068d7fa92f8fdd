// embedding_bag_psw_backward: d out / d per_sample_weights[p] = <grad_out[bag(p)], row[p]>,
// one warp per position, the row dequantized in registers and the dot product added in
// element order (common.cuh's ordered_sum), so it equals the CPU kernel's bit for bit.
// Zero for padding_idx and positions outside every bag. As in the lookup, an index outside
// the table is skipped (zero) without a synchronisation; QEMBED_CUDA_VALIDATE=1 raises.
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <type_traits>
#include "../checks.h"
#include "../padded_rows.h"
#include "common.cuh"
#include "launch.cuh"

namespace qembed {
namespace {

template <int BITS, typename index_t>
__global__ void psw_backward_kernel(const uint8_t* __restrict__ table, int64_t stride,
                                    int64_t num_rows, int64_t dim, int64_t fmt,
                                    const float* __restrict__ step,
                                    const index_t* __restrict__ idx, int64_t n,
                                    const int64_t* __restrict__ offsets, int64_t num_offsets,
                                    int64_t num_bags, int64_t padding_idx,
                                    const float* __restrict__ grad_out, int* error,
                                    float* __restrict__ out) {
  const int64_t p = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  // Only in validate mode are there more warps than positions: they check the offsets.
  if (error != nullptr && offsets != nullptr && lane == 0 && p < num_offsets &&
      bad_offset(offsets, p, n))
    atomicOr(error, kBadOffsets);
  if (p >= n) return;  // whole warps leave together
  const int64_t b = offsets == nullptr ? p : bag_of_position(p, offsets, num_offsets, num_bags);
  const int64_t r = static_cast<int64_t>(idx[p]);
  if (r < 0 || r >= num_rows) {
    if (error != nullptr && lane == 0) atomicOr(error, kBadIndex);
    return;
  }
  if (b < 0 || r == padding_idx) return;
  const uint8_t* row = table + r * stride;
  const RowParams prm = row_params(row, dim, BITS, fmt, fmt == SYM_TABLE ? *step : 0.0f);
  const float* g = grad_out + b * dim;
  const float dot = ordered_sum(dim / 8, lane, [&](int64_t gi, float (&t)[8]) {
    float v[8];
    decode_group<BITS>(row, gi, prm, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) t[i] = g[gi * 8 + i] * v[i];
  });
  if (lane == 0) out[p] = dot;
}

at::Tensor embedding_bag_psw_backward_cuda(const at::Tensor& grad_out_in,
                                           const at::Tensor& rows_in,
                                           const at::Tensor& indices_in,
                                           const at::Tensor& offsets_in,
                                           const c10::optional<at::Tensor>& step, int64_t bits,
                                           int64_t true_dim, int64_t fmt, int64_t mode,
                                           bool include_last_offset, int64_t padding_idx) {
  const int64_t num_out =
      check_psw_backward_args(grad_out_in, rows_in, indices_in, offsets_in, step, bits,
                              true_dim, fmt, mode, include_last_offset);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  // zero gradient on the pad columns: they add nothing to the dot products
  const at::Tensor grad_out = pad_columns(grad_out_in.to(at::kFloat)).contiguous();
  const int64_t dim = grad_out.size(1);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = indices.numel();
  at::Tensor out = at::zeros({n}, grad_out.options());
  at::Tensor offsets;
  if (mode != POOL_NONE) offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t num_offsets = offsets.defined() ? offsets.numel() : 0;
  const bool validate = validate_on_host();
  const int64_t warps = validate && num_offsets > n ? num_offsets : n;
  if (warps == 0) return out;
  at::Tensor step_t;
  if (fmt == SYM_TABLE) step_t = step->contiguous();
  const at::Tensor error =
      validate ? at::zeros({1}, rows.options().dtype(at::kInt)) : at::Tensor();
  QEMBED_DISPATCH_BITS(bits, [&] {
    auto run = [&](auto* idx) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      psw_backward_kernel<BITS, index_t><<<blocks_for(warps * kWarp), kBlock, 0,
                                           current_stream()>>>(
          rows.data_ptr<uint8_t>(), rows.size(1), rows.size(0), dim, fmt,
          step_t.defined() ? step_t.data_ptr<float>() : nullptr, idx, n,
          offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr, num_offsets, num_out,
          padding_idx, grad_out.data_ptr<float>(), validate ? error.data_ptr<int>() : nullptr,
          out.data_ptr<float>());
    };
    if (indices.scalar_type() == at::kInt)
      run(indices.data_ptr<int32_t>());
    else
      run(indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (validate) {
    const int flags = error.item<int>();
    TORCH_CHECK_INDEX(!(flags & kBadIndex), "qembed.embedding_bag_psw_backward: an index is out ",
                      "of range for a table of ", rows.size(0), " rows");
    TORCH_CHECK_VALUE(!(flags & kBadOffsets), "qembed.embedding_bag_psw_backward: offsets must ",
                      "start at 0, be non-decreasing and not pass the end of indices (", n, ")");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) {
  m.impl("embedding_bag_psw_backward", &embedding_bag_psw_backward_cuda);
}

}  // namespace qembed
