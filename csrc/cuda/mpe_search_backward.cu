// mpe_search_backward: every gradient of the MPE search from one pass over the distinct
// rows (see csrc/cpu/mpe_search_backward.cpp for the formulas), in the CPU kernel's order so
// the results are equal bit for bit, and without float atomics:
//   rows:   one warp per row, one lane per column: the row's weight and beta gradients, and
//           its per-candidate alpha and probs partials, each summed over the columns in
//           order (32 columns at a time, shuffled to every lane).
//   alpha:  one thread per candidate adds its partials in row order.
//   probs:  rows stably sorted by group; one thread per (group, candidate) adds the group's
//           partials in row order.
//   beta:   one thread per column adds its partials in row order.
// Rows or groups out of range are skipped (zero) without a synchronisation;
// QEMBED_CUDA_VALIDATE=1 waits and raises for them and for a non-positive alpha.
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <tuple>
#include "../checks.h"
#include "../lsq_plus.h"
#include "common.cuh"
#include "launch.cuh"
#include "mpe_search.cuh"

namespace qembed {
namespace {

__global__ void search_rows_kernel(Search q, const int64_t* __restrict__ uniq, int64_t u,
                                   const float* __restrict__ grad, int* error,
                                   float* __restrict__ grad_w, float* __restrict__ part_alpha,
                                   float* __restrict__ part_probs, float* __restrict__ part_beta,
                                   int64_t* __restrict__ group_of) {
  const int64_t i = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= u) return;  // whole warps leave together
  if (error != nullptr && i == 0 && lane == 0) check_alpha(q, error);
  const int64_t r = uniq[i], dim = q.dim;
  const float* p = row_probs(q, r, lane == 0 ? error : nullptr);
  if (lane == 0) group_of[i] = p == nullptr ? -1 : q.row_group[r];
  if (p == nullptr) return;  // its outputs stay zero
  float ga[kMaxCandidates], gp[kMaxCandidates];
#pragma unroll
  for (int k = 0; k < kMaxCandidates; ++k) ga[k] = gp[k] = 0.0f;
  for (int64_t base = 0; base < dim; base += kWarp) {
    const int64_t d = base + lane;
    const bool live = d < dim;
    const float w = live ? q.weight[r * dim + d] : 0.0f, g = live ? grad[i * dim + d] : 0.0f;
    const float beta = live ? q.beta[d] : 0.0f;
    const int count = dim - base < kWarp ? static_cast<int>(dim - base) : kWarp;
    float gw = 0.0f, gb = 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxCandidates; ++k) {
      if (k >= q.m) break;
      const int b = q.bits[k];
      if (b == 0) continue;
      const int32_t lo = qmin(b), hi = qmax(b);
      const float a = q.alpha[k], flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
      const float x = (w - beta) / a;
      const float pg = p[k] * g;
      const float tp = g * lsq_plus_value(w, beta, a, lo, hi);
      float ta;
      if (x >= flo && x <= fhi) {
        gw += pg;
        ta = pg * (nearbyintf(x) - x);
      } else {
        ta = pg * (x < flo ? flo : fhi);
        gb += q.scale[k] * pg;
      }
      for (int l = 0; l < count; ++l) {
        ga[k] += __shfl_sync(kFullMask, ta, l);
        gp[k] += __shfl_sync(kFullMask, tp, l);
      }
    }
    if (live) {
      grad_w[i * dim + d] = gw;
      part_beta[i * dim + d] = gb;
    }
  }
  if (lane != 0) return;
#pragma unroll
  for (int k = 0; k < kMaxCandidates; ++k) {
    if (k >= q.m) break;
    part_alpha[i * q.m + k] = ga[k];
    part_probs[i * q.m + k] = gp[k];
  }
}

__global__ void search_alpha_kernel(const float* __restrict__ part_alpha,
                                    const int64_t* __restrict__ group_of, int64_t u, Search q,
                                    float* __restrict__ grad_alpha) {
  const int k = threadIdx.x;
  if (k >= q.m) return;
  float acc = 0.0f;
  for (int64_t i = 0; i < u; ++i)
    if (group_of[i] >= 0) acc += part_alpha[i * q.m + k];
  grad_alpha[k] = acc * q.scale[k];
}

// Thread (g, k): the rows of group g are by_group[start[g] .. start[g + 1]), in row order.
__global__ void search_probs_kernel(const float* __restrict__ part_probs,
                                    const int64_t* __restrict__ by_group,
                                    const int64_t* __restrict__ start, int64_t groups, int m,
                                    float* __restrict__ grad_probs) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= groups * m) return;
  const int64_t g = t / m, k = t % m;
  float acc = 0.0f;
  for (int64_t j = start[g]; j < start[g + 1]; ++j) acc += part_probs[by_group[j] * m + k];
  grad_probs[t] = acc;
}

__global__ void search_beta_kernel(const float* __restrict__ part_beta,
                                   const int64_t* __restrict__ group_of, int64_t u, int64_t dim,
                                   float* __restrict__ grad_beta) {
  const int64_t d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (d >= dim) return;
  float acc = 0.0f;
  for (int64_t i = 0; i < u; ++i)
    if (group_of[i] >= 0) acc += part_beta[i * dim + d];
  grad_beta[d] = acc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mpe_search_backward_cuda(
    const at::Tensor& weight, const at::Tensor& unique_rows_in, const at::Tensor& grad_rows_in,
    const at::Tensor& row_group, const at::Tensor& probs, const at::Tensor& alpha,
    const at::Tensor& beta, c10::IntArrayRef bits, int64_t numel) {
  const char* op = "mpe_search_backward";
  const SearchTensors t = search_tensors(op, weight, row_group, probs, alpha, beta, bits);
  check_search_rows_args(weight, unique_rows_in, grad_rows_in, numel);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor uniq = unique_rows_in.to(at::kLong).contiguous();
  const int64_t u = uniq.numel(), dim = weight.size(1), m = static_cast<int64_t>(bits.size());
  const int64_t groups = probs.size(0);
  const at::Tensor grad = grad_rows_in.contiguous();
  const auto opts = t.weight.options();
  at::Tensor grad_w = at::zeros({u, dim}, opts);
  at::Tensor grad_alpha = at::zeros({m}, opts);
  at::Tensor grad_beta = at::zeros({dim}, opts);
  at::Tensor grad_probs = at::zeros({groups, m}, opts);
  if (u == 0) return {grad_w, grad_alpha, grad_beta, grad_probs};

  Search q = t.view(bits);
  for (int k = 0; k < q.m; ++k) q.scale[k] = lsq_plus_grad_scale(bits[k], numel);
  const bool validate = validate_on_host();
  const at::Tensor error = validate ? at::zeros({1}, opts.dtype(at::kInt)) : at::Tensor();
  at::Tensor part_alpha = at::zeros({u, m}, opts), part_probs = at::zeros({u, m}, opts);
  at::Tensor part_beta = at::zeros({u, dim}, opts);
  at::Tensor group_of = at::empty({u}, opts.dtype(at::kLong));
  const cudaStream_t stream = current_stream();
  search_rows_kernel<<<blocks_for(u * kWarp), kBlock, 0, stream>>>(
      q, uniq.data_ptr<int64_t>(), u, grad.data_ptr<float>(),
      validate ? error.data_ptr<int>() : nullptr, grad_w.data_ptr<float>(),
      part_alpha.data_ptr<float>(), part_probs.data_ptr<float>(), part_beta.data_ptr<float>(),
      group_of.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  search_alpha_kernel<<<1, kWarp, 0, stream>>>(part_alpha.data_ptr<float>(),
                                               group_of.data_ptr<int64_t>(), u, q,
                                               grad_alpha.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (dim > 0) {
    search_beta_kernel<<<blocks_for(dim), kBlock, 0, stream>>>(
        part_beta.data_ptr<float>(), group_of.data_ptr<int64_t>(), u, dim,
        grad_beta.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (groups > 0) {
    // Skipped rows (group -1) sort first and fall before group 0's start.
    at::Tensor sorted, by_group;
    std::tie(sorted, by_group) = at::sort(group_of, /*stable=*/true, /*dim=*/0,
                                          /*descending=*/false);
    const at::Tensor start = at::searchsorted(sorted, at::arange(groups + 1, sorted.options()));
    search_probs_kernel<<<blocks_for(groups * m), kBlock, 0, stream>>>(
        part_probs.data_ptr<float>(), by_group.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
        groups, static_cast<int>(m), grad_probs.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (validate) {
    const int flags = error.item<int>();
    TORCH_CHECK_INDEX(!(flags & kBadIndex), "qembed.", op, ": a row is out of range for a ",
                      "table of ", weight.size(0), " rows");
    TORCH_CHECK_INDEX(!(flags & kBadParam), "qembed.", op, ": a row_group entry is not a ",
                      "group of probs");
    TORCH_CHECK_VALUE(!(flags & kBadAlpha), "qembed.", op, ": alpha must be positive and ",
                      "finite");
  }
  return {grad_w, grad_alpha, grad_beta, grad_probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("mpe_search_backward", &mpe_search_backward_cuda); }

}  // namespace qembed
