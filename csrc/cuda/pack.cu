// pack: uint8 codes [N, D] -> dense bit-packed rows [N, code_bytes(D, bits)], one thread per
// 8 codes.
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include "../checks.h"
#include "../padded_rows.h"
#include "../rounding.h"
#include "launch.cuh"

namespace qembed {
namespace {

template <int BITS>
__global__ void pack_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                            int64_t num_groups) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= num_groups) return;
  uint32_t codes[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) codes[i] = src[g * 8 + i];
  pack_group<BITS>(codes, dst + g * BITS);
}

at::Tensor pack_cuda(const at::Tensor& codes_in, int64_t bits) {
  check_pack_args(codes_in, bits);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = pad_columns(codes_in).contiguous();  // pad codes 0
  const int64_t n = codes.size(0), dim = codes.size(1);
  // A conversion, not a hot path: the range check may wait for the device.
  if (codes.numel() > 0) {
    const int64_t top = codes.max().item<int64_t>();
    TORCH_CHECK_VALUE(top <= code_mask(bits), "qembed.pack: code ", top, " does not fit in ",
                      bits, " bits");
  }
  at::Tensor out = at::empty({n, code_bytes(dim, bits)}, codes.options());
  const int64_t groups = n * dim / 8;
  if (groups == 0) return out;
  QEMBED_DISPATCH_BITS(bits, [&] {
    pack_kernel<BITS><<<blocks_for(groups), kBlock, 0, current_stream()>>>(
        codes.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("pack", &pack_cuda); }

}  // namespace qembed
