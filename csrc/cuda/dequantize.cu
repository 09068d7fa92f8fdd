// dequantize: packed rows -> fp32 [N, dim], one thread per group of 8 codes. Values equal
// the CPU's bit for bit (same expression, no fused multiply-add).
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include "../checks.h"
#include "../padded_rows.h"
#include "launch.cuh"

namespace qembed {
namespace {

template <int BITS>
__global__ void dequantize_kernel(const uint8_t* __restrict__ rows, int64_t stride, int64_t dim,
                                  int64_t fmt, const float* __restrict__ step,
                                  float* __restrict__ out, int64_t num_groups) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= num_groups) return;
  const int64_t r = g / (dim / 8), col = g % (dim / 8);
  const uint8_t* row = rows + r * stride;
  const RowParams p = row_params(row, dim, BITS, fmt, fmt == SYM_TABLE ? *step : 0.0f);
  const uint64_t x = load_group<BITS>(row + col * BITS);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float q = static_cast<float>(static_cast<int32_t>(group_code<BITS>(x, i)) + p.offset);
    out[g * 8 + i] = 0.0f + (p.scale * q + p.bias);  // the CPU adds into a zeroed row
  }
}

at::Tensor dequantize_cuda(const at::Tensor& rows_in, int64_t bits, int64_t true_dim,
                           int64_t fmt, const c10::optional<at::Tensor>& step) {
  check_rows(rows_in, true_dim, bits, fmt);
  check_table_step(step, fmt, rows_in);
  const int64_t dim = padded_dim(true_dim);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.size(0);
  at::Tensor out = at::empty({n, dim}, rows.options().dtype(at::kFloat));
  const int64_t groups = n * dim / 8;
  if (groups == 0) return narrow_columns(out, true_dim);
  QEMBED_DISPATCH_BITS(bits, [&] {
    dequantize_kernel<BITS><<<blocks_for(groups), kBlock, 0, current_stream()>>>(
        rows.data_ptr<uint8_t>(), rows.size(1), dim, fmt,
        fmt == SYM_TABLE ? step->data_ptr<float>() : nullptr, out.data_ptr<float>(), groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return narrow_columns(out, true_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("dequantize", &dequantize_cuda); }

}  // namespace qembed
