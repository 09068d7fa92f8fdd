// quantize: fp32 rows -> packed rows with their parameters inline (layout.h), one warp per
// row, one lane per group of 8 codes. Codes equal the CPU's bit for bit: the same division
// and rounding (nvcc runs with --fmad=false) and the same Philox uniforms.
#include <ATen/ops/all.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include "../checks.h"
#include "../padded_rows.h"
#include "../philox.h"
#include "../rounding.h"
#include "launch.cuh"

namespace qembed {
namespace {

// The first minimum and first maximum of the row, as the CPU's left-to-right scan picks
// them (which matters only for the sign of a zero bias).
__device__ RowParams affine_params(const float* w, int64_t dim, int bits, int lane) {
  float lo = w[0], hi = w[0];
  int64_t lo_at = 0, hi_at = 0;
  for (int64_t d = lane; d < dim; d += kWarp) {
    if (w[d] < lo) {
      lo = w[d];
      lo_at = d;
    }
    if (w[d] > hi) {
      hi = w[d];
      hi_at = d;
    }
  }
  for (int s = kWarp / 2; s > 0; s /= 2) {
    const float olo = __shfl_xor_sync(0xffffffffu, lo, s);
    const float ohi = __shfl_xor_sync(0xffffffffu, hi, s);
    const int64_t olo_at = __shfl_xor_sync(0xffffffffu, lo_at, s);
    const int64_t ohi_at = __shfl_xor_sync(0xffffffffu, hi_at, s);
    if (olo < lo || (olo == lo && olo_at < lo_at)) {
      lo = olo;
      lo_at = olo_at;
    }
    if (ohi > hi || (ohi == hi && ohi_at < hi_at)) {
      hi = ohi;
      hi_at = ohi_at;
    }
  }
  float scale = (hi - lo) / static_cast<float>(code_mask(bits));
  if (!(scale > 0.0f)) scale = 1.0f;
  return {scale, lo, 0};
}

template <int BITS>
__global__ void quantize_kernel(const float* __restrict__ weight, int64_t n, int64_t dim,
                                int64_t fmt, const float* __restrict__ step, bool per_row_step,
                                bool stochastic, uint64_t seed, uint64_t counter,
                                uint8_t* __restrict__ out) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= n) return;  // whole warps leave together: n is counted in warps
  const float* w = weight + r * dim;
  uint8_t* row = out + r * row_bytes(dim, BITS, fmt);
  uint8_t* params = row + param_offset(dim, BITS);
  RowParams p;
  if (fmt == AFFINE) {
    p = affine_params(w, dim, BITS, lane);
    if (lane == 0) {
      write_f32(params, p.scale);
      write_f32(params + 4, p.bias);
    }
  } else {
    p = {step[per_row_step ? r : 0], 0.0f, qmin(BITS)};
    if (fmt == SYM_ROW && lane == 0) write_f32(params, p.scale);
  }
  const int32_t lo = p.offset, hi = p.offset + static_cast<int32_t>(code_mask(BITS));
  for (int64_t g = lane; g < dim / 8; g += kWarp) {
    float u[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (stochastic) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const Philox4 q = sr_block(seed, counter, static_cast<uint64_t>(r), 2 * g + half);
#pragma unroll
        for (int j = 0; j < 4; ++j) u[4 * half + j] = uniform_from_bits(q.v[j]);
      }
    }
    uint32_t codes[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float x = (w[g * 8 + i] - p.bias) / p.scale;
      codes[i] = static_cast<uint32_t>(round_to_code(x, u[i], stochastic, lo, hi) - lo);
    }
    pack_group<BITS>(codes, row + g * BITS);
  }
}

at::Tensor quantize_cuda(const at::Tensor& weight_in, int64_t bits, int64_t fmt,
                         const c10::optional<at::Tensor>& step_in, bool stochastic,
                         int64_t seed, int64_t counter) {
  check_quantize_args(weight_in, bits, fmt, step_in);
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight =
      (fmt == AFFINE ? pad_columns_with_row_min(weight_in) : pad_columns(weight_in)).contiguous();
  const int64_t n = weight.size(0), dim = weight.size(1);
  // A conversion, not a hot path: the value checks may wait for the device.
  TORCH_CHECK_VALUE(at::isfinite(weight).all().item<bool>(),
                    "qembed.quantize: weight has a non-finite value");
  at::Tensor step;
  if (fmt != AFFINE) {
    step = step_in->contiguous();
    TORCH_CHECK_VALUE(at::isfinite(step).logical_and(step.gt(0)).all().item<bool>(),
                      "qembed.quantize: steps must be positive and finite");
  }
  at::Tensor out = at::zeros({n, row_bytes(dim, bits, fmt)}, weight.options().dtype(at::kByte));
  if (n == 0) return out;
  QEMBED_DISPATCH_BITS(bits, [&] {
    quantize_kernel<BITS><<<blocks_for(n * kWarp), kBlock, 0, current_stream()>>>(
        weight.data_ptr<float>(), n, dim, fmt, step.defined() ? step.data_ptr<float>() : nullptr,
        step.defined() && step.numel() > 1, stochastic, static_cast<uint64_t>(seed),
        static_cast<uint64_t>(counter), out.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("quantize", &quantize_cuda); }

}  // namespace qembed
