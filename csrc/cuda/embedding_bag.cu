// embedding_bag: fused gather-dequantize-pool over packed rows, one warp per bag.
//
// A row's codes are read as 4-byte words (rows are 4-byte aligned, layout.h). A "unit" is
// the smallest run of whole words holding whole codes: 32/gcd(bits, 4) codes in
// bits/gcd(bits, 4) words. A row of U units is covered by T lanes (a power of two, each
// lane taking units sub, sub + T, ...: consecutive lanes read consecutive words), so a
// warp reads G = 32/T rows of its bag at once; the G partial sums meet in registers at the
// end. Lanes hold at most 32 fp32 accumulators; rows wider than 32*32 codes go in column
// chunks. Indices and weights are loaded 32 at a time, one per lane, and shuffled.
//
// Bad input is never read through: an index outside the table is skipped (as padding) and
// offsets are clamped into [0, num indices]. Without a synchronisation the lookup cannot
// raise, so by default it does not look back; QEMBED_CUDA_VALIDATE=1 (a debug mode) has the
// kernel flag what it met and the host wait for the flag and raise as the CPU does.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include "../checks.h"
#include "launch.cuh"
#include "pool_bag.cuh"

namespace qembed {
namespace {

template <int BITS, typename index_t, typename out_t>
__global__ void pool_kernel(Table t, const index_t* __restrict__ idx, int64_t n,
                            const int64_t* __restrict__ offsets, int64_t num_offsets,
                            int64_t num_bags, const float* __restrict__ psw, bool mean,
                            int lanes, int* error, out_t* __restrict__ out) {
  const int64_t bag = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  if (bag >= num_bags) return;  // whole warps leave together
  int64_t start, end;
  const bool bad = bag_range(offsets, num_offsets, bag, n, start, end);
  if (bad && error && threadIdx.x % kWarp == 0) atomicOr(error, kBadOffsets);
  pool_bag_warp<BITS>(t, idx, start, end, psw, mean, lanes, error, out + bag * t.dim);
}

// mode none: out[p] = psw_p * dequantize(row[idx[p]]), rounded exactly as dequantize does;
// each group of `lanes` lanes serves one position.
template <int BITS, typename index_t, typename out_t>
__global__ void rows_kernel(Table t, const index_t* __restrict__ idx, int64_t n,
                            const float* __restrict__ psw, int lanes, int* error,
                            out_t* __restrict__ out) {
  using U = Unit<BITS>;
  const int64_t thread = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t pos = thread / lanes;
  const int sub = threadIdx.x % lanes;
  if (pos >= n) return;  // no shuffles here: lanes may leave alone
  const int64_t r = row_of(idx[pos], t, sub == 0 ? error : nullptr);
  const float w = psw ? psw[pos] : 1.0f;
  const uint32_t* row = t.words + (r >= 0 ? r : 0) * t.stride_words;
  RowParams p{0.0f, 0.0f, 0};  // a skipped row reads as zeros
  if (r >= 0)
    p = row_params(reinterpret_cast<const uint8_t*>(row), t.dim, BITS, t.fmt,
                   t.fmt == SYM_TABLE ? *t.step : 0.0f);
  const int64_t units = (t.dim + U::kCodes - 1) / U::kCodes;
  const int64_t code_words = param_offset(t.dim, BITS) / 4;
  for (int64_t unit = sub; unit < units; unit += lanes) {
    uint32_t words[U::kWords];
    load_unit<BITS>(row, unit, code_words, r >= 0, words);
#pragma unroll
    for (int i = 0; i < U::kCodes; ++i) {
      const float q = unit_code<BITS>(words, i) + static_cast<float>(p.offset);
      store(out + pos * t.dim, unit * U::kCodes + i, t.dim, (0.0f + (p.scale * q + p.bias)) * w);
    }
  }
}

template <typename index_t, typename out_t>
void launch(int64_t bits, const Table& t, const at::Tensor& indices, const at::Tensor& offsets,
            int64_t num_bags, const float* psw, int64_t mode, int* error, at::Tensor& out) {
  const index_t* idx = indices.data_ptr<index_t>();
  const int64_t n = indices.numel();
  out_t* dst = static_cast<out_t*>(out.data_ptr());
  QEMBED_DISPATCH_BITS(bits, [&] {
    using U = Unit<BITS>;
    const int lanes = lanes_per_row((t.dim + U::kCodes - 1) / U::kCodes, U::kPerLane);
    if (mode == POOL_NONE) {
      rows_kernel<BITS, index_t, out_t><<<blocks_for(n * lanes), kBlock, 0, current_stream()>>>(
          t, idx, n, psw, lanes, error, dst);
    } else {
      pool_kernel<BITS, index_t, out_t>
          <<<blocks_for(num_bags * kWarp), kBlock, 0, current_stream()>>>(
              t, idx, n, offsets.data_ptr<int64_t>(), offsets.numel(), num_bags, psw,
              mode == POOL_MEAN, lanes, error, dst);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename index_t>
void launch_for_output(at::ScalarType out_dtype, int64_t bits, const Table& t,
                       const at::Tensor& indices, const at::Tensor& offsets, int64_t num_bags,
                       const float* psw, int64_t mode, int* error, at::Tensor& out) {
  if (out_dtype == at::kFloat)
    launch<index_t, float>(bits, t, indices, offsets, num_bags, psw, mode, error, out);
  else if (out_dtype == at::kHalf)
    launch<index_t, at::Half>(bits, t, indices, offsets, num_bags, psw, mode, error, out);
  else
    launch<index_t, at::BFloat16>(bits, t, indices, offsets, num_bags, psw, mode, error, out);
}

at::Tensor embedding_bag_cuda(const at::Tensor& rows_in, const at::Tensor& indices_in,
                              const at::Tensor& offsets_in,
                              const c10::optional<at::Tensor>& psw_in,
                              const c10::optional<at::Tensor>& step, int64_t bits, int64_t dim,
                              int64_t fmt, int64_t mode, bool include_last_offset,
                              int64_t padding_idx, at::ScalarType out_dtype) {
  const int64_t num_out = check_lookup_args(rows_in, indices_in, offsets_in, psw_in, step, bits,
                                            dim, fmt, mode, include_last_offset, out_dtype);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor rows = word_aligned(rows_in);
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor out = at::empty({num_out, dim}, rows.options().dtype(out_dtype));
  if (num_out == 0) return out;
  // Offsets are few (one per bag): one int64 copy saves a template parameter.
  const at::Tensor offsets =
      mode == POOL_NONE ? at::Tensor() : offsets_in.to(at::kLong).contiguous();
  at::Tensor psw;
  if (psw_in.has_value()) psw = psw_in->to(at::kFloat).contiguous();
  at::Tensor step_t;
  if (fmt == SYM_TABLE) step_t = step->contiguous();
  const Table t{reinterpret_cast<const uint32_t*>(rows.data_ptr<uint8_t>()),
                rows.size(1) / 4,
                rows.size(0),
                dim,
                fmt,
                padding_idx,
                step_t.defined() ? step_t.data_ptr<float>() : nullptr};
  const bool validate = validate_on_host();
  const at::Tensor error =
      validate ? at::zeros({1}, rows.options().dtype(at::kInt)) : at::Tensor();
  int* err = validate ? error.data_ptr<int>() : nullptr;
  const float* w = psw.defined() ? psw.data_ptr<float>() : nullptr;
  if (indices.scalar_type() == at::kInt)
    launch_for_output<int32_t>(out_dtype, bits, t, indices, offsets, num_out, w, mode, err, out);
  else
    launch_for_output<int64_t>(out_dtype, bits, t, indices, offsets, num_out, w, mode, err, out);
  if (validate) {
    const int flags = error.item<int>();
    TORCH_CHECK_INDEX(!(flags & kBadIndex), "qembed.embedding_bag: an index is out of range ",
                      "for a table of ", rows.size(0), " rows");
    TORCH_CHECK_VALUE(!(flags & kBadOffsets), "qembed.embedding_bag: offsets must start at 0, ",
                      "be non-decreasing and not pass the end of indices (", indices.numel(), ")");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("embedding_bag", &embedding_bag_cuda); }

}  // namespace qembed
