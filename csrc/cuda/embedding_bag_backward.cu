// embedding_bag_backward: the gradient of the fused lookup per distinct row, sort-based and
// without float atomics, so the result is the same on every run and equals the CPU
// kernel's bit for bit:
//   1. keys: each position's row, or a sentinel that sorts last (padding_idx, negative
//      indices, positions outside every bag); its bag by binary search in offsets; for
//      mean, each bag's count of rows (integer atomics).
//   2. a stable sort of the keys orders positions by row, repeats in batch order.
//   3. the first position of each run of equal keys is flagged; a prefix sum numbers the
//      runs. Their count sizes the outputs: the one value the host waits for.
//   4. one warp per (distinct row, 32 columns) adds its run's contributions in batch order,
//      as the CPU kernel and the reference do.
// Bad offsets or a negative index raise, as on the CPU: their flags travel to the host with
// the run count.
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <limits>
#include <tuple>
#include "../checks.h"
#include "common.cuh"
#include "launch.cuh"

namespace qembed {
namespace {

constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();

template <typename index_t>
__global__ void keys_kernel(const index_t* __restrict__ idx, int64_t n,
                            const int64_t* __restrict__ offsets, int64_t num_offsets,
                            int64_t num_bags, bool per_index, int64_t padding_idx,
                            int64_t* __restrict__ key, int64_t* __restrict__ bag_of,
                            int32_t* __restrict__ count, unsigned long long* error) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (!per_index && t < num_offsets && bad_offset(offsets, t, n)) atomicOr(error, kBadOffsets);
  if (t >= n) return;
  const int64_t b = per_index ? t : bag_of_position(t, offsets, num_offsets, num_bags);
  const int64_t r = static_cast<int64_t>(idx[t]);
  if (r < 0) atomicOr(error, kBadIndex);
  const bool live = b >= 0 && r >= 0 && r != padding_idx;
  key[t] = live ? r : kNoRow;
  bag_of[t] = b;
  if (count != nullptr && live) atomicAdd(count + b, 1);
}

// Over the sorted keys: run starts, and each position's bag and factor in sorted order (the
// factor as the CPU computes it: the weight, 1 / count for mean, or 1).
__global__ void runs_kernel(const int64_t* __restrict__ key, const int64_t* __restrict__ perm,
                            int64_t n, const int64_t* __restrict__ bag_of,
                            const float* __restrict__ psw, const int32_t* __restrict__ count,
                            int64_t* __restrict__ is_start, int64_t* __restrict__ run_bag,
                            float* __restrict__ run_factor) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= n) return;
  const int64_t k = key[j];
  is_start[j] = k != kNoRow && (j == 0 || key[j - 1] != k);
  if (k == kNoRow) return;
  const int64_t p = perm[j], b = bag_of[p];
  run_bag[j] = b;
  float f = 1.0f;
  if (psw != nullptr)
    f = psw[p];
  else if (count != nullptr)
    f = 1.0f / static_cast<float>(count[b] > 1 ? count[b] : 1);
  run_factor[j] = f;
}

__global__ void starts_kernel(const int64_t* __restrict__ key, const int64_t* __restrict__ is_start,
                              const int64_t* __restrict__ run_id, int64_t n,
                              int64_t* __restrict__ start, int64_t* __restrict__ unique_rows) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= n || !is_start[j]) return;
  start[run_id[j] - 1] = j;
  unique_rows[run_id[j] - 1] = key[j];
}

// Warp w sums columns [32c, 32c + 32) of distinct row k = w / chunks, c = w % chunks. A run's
// positions are read 32 at a time, one per lane, and shuffled: they belong to the run up to
// the first key that differs (the keys are sorted), so the run's lanes are a prefix.
__global__ void accumulate_kernel(const int64_t* __restrict__ key,
                                  const int64_t* __restrict__ run_bag,
                                  const float* __restrict__ run_factor, int64_t n,
                                  const int64_t* __restrict__ start,
                                  const int64_t* __restrict__ unique_rows, int64_t num_unique,
                                  const float* __restrict__ grad_out, int64_t dim,
                                  int64_t chunks, float* __restrict__ out) {
  const int64_t w = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  if (w >= num_unique * chunks) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const int64_t k = w / chunks, d = (w % chunks) * kWarp + lane, row = unique_rows[k];
  float acc = 0.0f;
  for (int64_t j0 = start[k];; j0 += kWarp) {
    const int64_t j = j0 + lane;
    const bool mine = j < n && key[j] == row;
    const int64_t b = mine ? run_bag[j] : 0;
    const float f = mine ? run_factor[j] : 0.0f;
    const int m = __popc(__ballot_sync(kFullMask, mine));
#pragma unroll 4
    for (int t = 0; t < m; ++t) {
      const int64_t bt = __shfl_sync(kFullMask, b, t);
      const float ft = __shfl_sync(kFullMask, f, t);
      if (d < dim) acc += grad_out[bt * dim + d] * ft;
    }
    if (m < kWarp) break;
  }
  if (d < dim) out[k * dim + d] = acc;
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    const c10::optional<at::Tensor>& psw_in, int64_t mode, bool include_last_offset,
    int64_t padding_idx) {
  check_backward_args(grad_out_in, indices_in, offsets_in, psw_in, mode, include_last_offset);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.to(at::kFloat).contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = indices.numel(), dim = grad_out.size(1);
  const bool per_index = mode == POOL_NONE;

  at::Tensor psw;
  if (psw_in.has_value()) psw = psw_in->to(at::kFloat).contiguous();
  at::Tensor offsets;
  const int64_t num_bags = grad_out.size(0);
  if (!per_index) offsets = offsets_in.to(at::kLong).contiguous();
  const auto long_opts = grad_out.options().dtype(at::kLong);
  const int64_t num_offsets = per_index ? 0 : offsets.numel();
  const int64_t threads = n > num_offsets ? n : num_offsets;
  if (threads == 0) return {at::empty({0}, long_opts), at::empty({0, dim}, grad_out.options())};

  // meta = {number of distinct rows, error flags}: one copy to the host for both.
  at::Tensor meta = at::zeros({2}, long_opts);
  at::Tensor key = at::empty({n}, long_opts), bag_of = at::empty({n}, long_opts);
  at::Tensor count;
  if (mode == POOL_MEAN) count = at::zeros({num_bags}, grad_out.options().dtype(at::kInt));
  int32_t* count_p = count.defined() ? count.data_ptr<int32_t>() : nullptr;
  const int64_t* off_p = per_index ? nullptr : offsets.data_ptr<int64_t>();
  auto* error = reinterpret_cast<unsigned long long*>(meta.data_ptr<int64_t>() + 1);
  const cudaStream_t stream = current_stream();
  if (indices.scalar_type() == at::kInt)
    keys_kernel<int32_t><<<blocks_for(threads), kBlock, 0, stream>>>(
        indices.data_ptr<int32_t>(), n, off_p, num_offsets, num_bags, per_index, padding_idx,
        key.data_ptr<int64_t>(), bag_of.data_ptr<int64_t>(), count_p, error);
  else
    keys_kernel<int64_t><<<blocks_for(threads), kBlock, 0, stream>>>(
        indices.data_ptr<int64_t>(), n, off_p, num_offsets, num_bags, per_index, padding_idx,
        key.data_ptr<int64_t>(), bag_of.data_ptr<int64_t>(), count_p, error);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor sorted, perm, is_start, run_bag, run_factor, run_id;
  if (n > 0) {
    std::tie(sorted, perm) = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    is_start = at::empty({n}, long_opts);
    run_bag = at::empty({n}, long_opts);
    run_factor = at::empty({n}, grad_out.options());
    runs_kernel<<<blocks_for(n), kBlock, 0, stream>>>(
        sorted.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), n, bag_of.data_ptr<int64_t>(),
        psw.defined() ? psw.data_ptr<float>() : nullptr, count_p, is_start.data_ptr<int64_t>(),
        run_bag.data_ptr<int64_t>(), run_factor.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    run_id = at::cumsum(is_start, 0);
    meta.select(0, 0).copy_(run_id.select(0, n - 1));
  }
  const at::Tensor host = meta.cpu();  // waits for the kernels
  const int64_t num_unique = host.data_ptr<int64_t>()[0], flags = host.data_ptr<int64_t>()[1];
  TORCH_CHECK_INDEX(!(flags & kBadIndex), "qembed.embedding_bag_backward: negative index");
  TORCH_CHECK_VALUE(!(flags & kBadOffsets), "qembed.embedding_bag_backward: offsets must start ",
                    "at 0, be non-decreasing and not pass the end of indices (", n, ")");

  at::Tensor unique_rows = at::empty({num_unique}, long_opts);
  at::Tensor grad_rows = at::empty({num_unique, dim}, grad_out.options());
  if (num_unique == 0) return {unique_rows, grad_rows};
  at::Tensor start = at::empty({num_unique}, long_opts);
  starts_kernel<<<blocks_for(n), kBlock, 0, stream>>>(
      sorted.data_ptr<int64_t>(), is_start.data_ptr<int64_t>(), run_id.data_ptr<int64_t>(), n,
      start.data_ptr<int64_t>(), unique_rows.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t chunks = (dim + kWarp - 1) / kWarp;
  if (chunks == 0) return {unique_rows, grad_rows};
  accumulate_kernel<<<blocks_for(num_unique * chunks * kWarp), kBlock, 0, stream>>>(
      sorted.data_ptr<int64_t>(), run_bag.data_ptr<int64_t>(), run_factor.data_ptr<float>(), n,
      start.data_ptr<int64_t>(), unique_rows.data_ptr<int64_t>(), num_unique,
      grad_out.data_ptr<float>(), dim, chunks, grad_rows.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {unique_rows, grad_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) {
  m.impl("embedding_bag_backward", &embedding_bag_backward_cuda);
}

}  // namespace qembed
