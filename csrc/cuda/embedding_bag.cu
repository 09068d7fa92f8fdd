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

namespace qembed {
namespace {

constexpr int kBadIndex = 1, kBadOffsets = 2;  // error flags
constexpr unsigned kAll = 0xffffffffu;

template <int BITS>
struct Unit {
  static constexpr int kGcd = BITS % 4 == 0 ? 4 : (BITS % 2 == 0 ? 2 : 1);
  static constexpr int kWords = BITS / kGcd;
  static constexpr int kCodes = 32 / kGcd;
  static constexpr int kPerLane = 32 / kCodes;  // units per lane and chunk: 32 codes
};

// Lanes per row: the fewest that cover a row's units with kPerLane units each.
int lanes_per_row(int64_t units, int per_lane) {
  int t = 1;
  while (t < kWarp && static_cast<int64_t>(t) * per_lane < units) t *= 2;
  return t;
}

// Code i of a unit, from the unit's words read as one little-endian bit string.
template <int BITS>
__device__ __forceinline__ float unit_code(const uint32_t (&w)[Unit<BITS>::kWords], int i) {
  const int bit = i * BITS, word = bit / 32, shift = bit % 32;
  uint32_t v = w[word] >> shift;
  if (shift + BITS > 32) v |= w[word + 1] << (32 - shift);
  return static_cast<float>(v & code_mask(BITS));
}

// The words of unit `unit` of a row; words past the codes (padding, parameters, or past
// the table for its last row) are not read.
template <int BITS>
__device__ __forceinline__ void load_unit(const uint32_t* row, int64_t unit, int64_t code_words,
                                          bool live, uint32_t (&w)[Unit<BITS>::kWords]) {
#pragma unroll
  for (int t = 0; t < Unit<BITS>::kWords; ++t) {
    const int64_t at = unit * Unit<BITS>::kWords + t;
    w[t] = live && at < code_words ? __ldg(row + at) : 0u;
  }
}

struct Table {
  const uint32_t* words;
  int64_t stride_words, num_rows, dim, fmt, padding_idx;
  const float* step;  // SYM_TABLE only
};

// The row of an index, or -1 to skip it (padding, or out of range: flagged).
template <typename index_t>
__device__ __forceinline__ int64_t row_of(index_t i, const Table& t, int* error) {
  const int64_t r = static_cast<int64_t>(i);
  if (r < 0 || r >= t.num_rows) {
    if (error) atomicOr(error, kBadIndex);
    return -1;
  }
  return r == t.padding_idx ? -1 : r;
}

template <typename out_t>
__device__ __forceinline__ void store(out_t* out, int64_t d, int64_t dim, float v) {
  if (d < dim) out[d] = static_cast<out_t>(v);
}

template <int BITS, typename index_t, typename out_t>
__global__ void pool_kernel(Table t, const index_t* __restrict__ idx, int64_t n,
                            const int64_t* __restrict__ offsets, int64_t num_offsets,
                            int64_t num_bags, const float* __restrict__ psw, bool mean,
                            int lanes, int* error, out_t* __restrict__ out) {
  using U = Unit<BITS>;
  const int64_t bag = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  if (bag >= num_bags) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp, sub = lane % lanes, group = lane / lanes;
  const int groups = kWarp / lanes;

  int64_t start = offsets[bag], end = bag + 1 < num_offsets ? offsets[bag + 1] : n;
  const bool bad = (bag == 0 && start != 0) || start < 0 || end < start || end > n;
  if (bad && error && lane == 0) atomicOr(error, kBadOffsets);
  start = start < 0 ? 0 : (start > n ? n : start);
  end = end < start ? start : (end > n ? n : end);

  const float table_step = t.fmt == SYM_TABLE ? *t.step : 0.0f;
  const int64_t units = (t.dim + U::kCodes - 1) / U::kCodes;
  const int64_t code_words = param_offset(t.dim, BITS) / 4;
  out_t* dst = out + bag * t.dim;
  float shift = 0.0f, count = 0.0f;  // the rows' constant terms and their number

  for (int64_t c0 = 0; c0 < units; c0 += static_cast<int64_t>(lanes) * U::kPerLane) {
    float acc[U::kPerLane][U::kCodes] = {};
    for (int64_t p0 = start; p0 < end; p0 += kWarp) {
      int64_t my_row = -1;
      float my_w = 0.0f;
      if (p0 + lane < end) {
        my_row = row_of(idx[p0 + lane], t, c0 == 0 ? error : nullptr);
        my_w = psw ? psw[p0 + lane] : 1.0f;
      }
      const int m = end - p0 < kWarp ? static_cast<int>(end - p0) : kWarp;
#pragma unroll 2
      for (int j = 0; j < m; j += groups) {
        const int64_t r = __shfl_sync(kAll, my_row, j + group);
        const float w = __shfl_sync(kAll, my_w, j + group);
        const bool live = j + group < m && r >= 0;
        const uint32_t* row = t.words + (live ? r : 0) * t.stride_words;
        float a = 0.0f;
        if (live) {
          const RowParams p = row_params(reinterpret_cast<const uint8_t*>(row), t.dim, BITS,
                                         t.fmt, table_step);
          a = w * p.scale;
          if (c0 == 0) {
            shift += a * static_cast<float>(p.offset) + w * p.bias;
            count += 1.0f;
          }
        }
#pragma unroll
        for (int k = 0; k < U::kPerLane; ++k) {
          const int64_t unit = c0 + k * lanes + sub;
          uint32_t words[U::kWords];
          load_unit<BITS>(row, unit, code_words, live && unit < units, words);
#pragma unroll
          for (int i = 0; i < U::kCodes; ++i) acc[k][i] = fmaf(a, unit_code<BITS>(words, i), acc[k][i]);
        }
      }
    }
    // Sum the groups' partial rows (and, once, their constant terms).
    for (int s = lanes; s < kWarp; s *= 2) {
#pragma unroll
      for (int k = 0; k < U::kPerLane; ++k)
#pragma unroll
        for (int i = 0; i < U::kCodes; ++i) acc[k][i] += __shfl_xor_sync(kAll, acc[k][i], s);
      if (c0 == 0) {
        shift += __shfl_xor_sync(kAll, shift, s);
        count += __shfl_xor_sync(kAll, count, s);
      }
    }
    if (group != 0) continue;
    const float factor = mean && count > 0.0f ? 1.0f / count : 1.0f;
#pragma unroll
    for (int k = 0; k < U::kPerLane; ++k) {
      const int64_t unit = c0 + k * lanes + sub;
#pragma unroll
      for (int i = 0; i < U::kCodes; ++i)
        store(dst, unit * U::kCodes + i, t.dim, (acc[k][i] + shift) * factor);
    }
  }
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
