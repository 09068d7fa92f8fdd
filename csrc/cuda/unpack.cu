// unpack: bit-packed rows [N, >= code_bytes(D, bits)] -> uint8 codes [N, D], one thread per
// 8 codes.
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include "../checks.h"
#include "../padded_rows.h"
#include "launch.cuh"

namespace qembed {
namespace {

template <int BITS>
__global__ void unpack_kernel(const uint8_t* __restrict__ src, int64_t stride, int64_t dim,
                              uint8_t* __restrict__ dst, int64_t num_groups) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= num_groups) return;
  const int64_t row = g / (dim / 8), col = g % (dim / 8);
  const uint64_t x = load_group<BITS>(src + row * stride + col * BITS);
#pragma unroll
  for (int i = 0; i < 8; ++i) dst[g * 8 + i] = static_cast<uint8_t>(group_code<BITS>(x, i));
}

at::Tensor unpack_cuda(const at::Tensor& packed_in, int64_t bits, int64_t true_dim) {
  check_unpack_args(packed_in, bits, true_dim);
  const int64_t dim = padded_dim(true_dim);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const int64_t n = packed.size(0);
  at::Tensor out = at::empty({n, dim}, packed.options());
  const int64_t groups = n * dim / 8;
  if (groups == 0) return narrow_columns(out, true_dim);
  QEMBED_DISPATCH_BITS(bits, [&] {
    unpack_kernel<BITS><<<blocks_for(groups), kBlock, 0, current_stream()>>>(
        packed.data_ptr<uint8_t>(), packed.size(1), dim, out.data_ptr<uint8_t>(), groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return narrow_columns(out, true_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("unpack", &unpack_cuda); }

}  // namespace qembed
