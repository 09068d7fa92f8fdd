// mpe_embedding_bag: one lookup over a mixed-width table (see the CPU kernel for the layout),
// one warp per output row, one lane per column. A stored row of segment s adds
// w * step_s * (code + Qn_s) + w * beta, accumulated as the CPU does: a fused multiply-add on
// the raw code per row, the rows' constant terms summed apart and added once. Pruned rows
// (location -1) add nothing and still count in a mean. Indices or locations out of range
// are skipped without a synchronisation; QEMBED_CUDA_VALIDATE=1 waits and raises for them,
// bad offsets, non-positive steps and malformed row ranges, as the CPU does.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "common.cuh"
#include "launch.cuh"

namespace qembed {
namespace {

constexpr int kMaxSegments = 16;
constexpr int kBadStep = 16;  // error flag beside common.cuh's

struct MixedTable {
  const uint8_t* data[kMaxSegments];
  int64_t stride[kMaxSegments];
  int64_t end[kMaxSegments];  // past the segment's last position in the concatenation
  int bits[kMaxSegments];
  int num_segments;
  int64_t total;  // rows in all segments
  const float* steps;
  const float* beta;
  int64_t dim;
};

// Rows' positions from a row map (int16 or int32 [R]).
template <typename map_t>
struct RowMap {
  const map_t* location;
  int64_t num_rows;
  __device__ __forceinline__ int64_t rows() const { return num_rows; }
  __device__ __forceinline__ int64_t position(int64_t r) const { return location[r]; }
};

// Rows' positions from row ranges (int32 [num_ranges + 1][2]); the row count is their last
// entry, read on the device. Malformed ranges give positions that are checked like a map's.
struct RowRanges {
  const int32_t* ranges;
  int64_t num_ranges;
  __device__ __forceinline__ int64_t rows() const { return ranges[2 * num_ranges]; }
  __device__ __forceinline__ int64_t position(int64_t r) const {
    return range_position(ranges, num_ranges, r);
  }
};

// Row r's codes and segment, or false for a pruned row or one out of range (flagged).
template <typename Locator>
__device__ __forceinline__ bool locate(const MixedTable& t, const Locator& locator, int64_t r,
                                       int* error, const uint8_t*& row, int& seg) {
  if (r < 0 || r >= locator.rows()) {
    if (error != nullptr) atomicOr(error, kBadIndex);
    return false;
  }
  const int64_t loc = locator.position(r);
  if (loc == -1) return false;
  if (loc < -1 || loc >= t.total) {
    if (error != nullptr) atomicOr(error, kBadParam);
    return false;
  }
  int s = 0;
  while (loc >= t.end[s]) ++s;
  row = t.data[s] + (loc - (s > 0 ? t.end[s - 1] : 0)) * t.stride[s];
  seg = s;
  return true;
}

// Code d of a row of `bits`-bit codes: bits [d*bits, d*bits + bits) of the row read as a
// little-endian bit string; the second byte only when the code reaches into it.
__device__ __forceinline__ uint32_t code_at(const uint8_t* row, int64_t d, int bits) {
  const int64_t bit = d * bits;
  const int shift = static_cast<int>(bit % 8);
  const uint8_t* p = row + bit / 8;
  uint32_t v = static_cast<uint32_t>(p[0]) >> shift;
  if (shift + bits > 8) v |= static_cast<uint32_t>(p[1]) << (8 - shift);
  return v & ((1u << bits) - 1u);
}

template <typename Locator, typename out_t>
__global__ void mixed_lookup_kernel(MixedTable t, Locator locator,
                                    const int64_t* __restrict__ idx, int64_t n,
                                    const int64_t* __restrict__ offsets, int64_t num_offsets,
                                    int64_t num_out, const float* __restrict__ psw, bool mean,
                                    int* error, out_t* __restrict__ out) {
  const int64_t o = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (o >= num_out) return;
  if (error != nullptr && o == 0 && lane == 0)
    for (int s = 0; s < t.num_segments; ++s)
      if (!(isfinite(t.steps[s]) && t.steps[s] > 0.0f)) atomicOr(error, kBadStep);
  int64_t start = o, end = o + 1;  // mode none: one position per output row
  if (offsets != nullptr && bag_range(offsets, num_offsets, o, n, start, end) &&
      error != nullptr && lane == 0)
    atomicOr(error, kBadOffsets);
  for (int64_t d = lane; d < t.dim; d += kWarp) {
    float acc = 0.0f, shift = 0.0f, weight = 0.0f;  // weight: sum of w over stored rows
    for (int64_t p = start; p < end; ++p) {
      const uint8_t* row;
      int s;
      if (!locate(t, locator, idx[p], d == lane ? error : nullptr, row, s)) continue;
      const float w = psw != nullptr ? psw[p] : 1.0f, a = w * t.steps[s];
      acc = fmaf(a, static_cast<float>(code_at(row, d, t.bits[s])), acc);
      shift += a * static_cast<float>(qmin(t.bits[s]));
      weight += w;
    }
    const float factor = mean && end > start ? 1.0f / static_cast<float>(end - start) : 1.0f;
    out[o * t.dim + d] = static_cast<out_t>((acc + shift + weight * t.beta[d]) * factor);
  }
}

template <typename Locator, typename out_t>
void launch(const MixedTable& t, const Locator& locator, const at::Tensor& indices,
            const at::Tensor& offsets, int64_t num_out, const float* psw, bool mean, int* error,
            at::Tensor& out) {
  mixed_lookup_kernel<Locator, out_t><<<blocks_for(num_out * kWarp), kBlock, 0, current_stream()>>>(
      t, locator, indices.data_ptr<int64_t>(), indices.numel(),
      offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr,
      offsets.defined() ? offsets.numel() : 0, num_out, psw, mean, error,
      static_cast<out_t*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Locator>
void launch_for_output(const MixedTable& t, const Locator& locator, const at::Tensor& indices,
                       const at::Tensor& offsets, int64_t num_out, const float* psw, bool mean,
                       int* error, at::Tensor& out) {
  if (out.scalar_type() == at::kFloat)
    launch<Locator, float>(t, locator, indices, offsets, num_out, psw, mean, error, out);
  else if (out.scalar_type() == at::kHalf)
    launch<Locator, at::Half>(t, locator, indices, offsets, num_out, psw, mean, error, out);
  else
    launch<Locator, at::BFloat16>(t, locator, indices, offsets, num_out, psw, mean, error, out);
}

at::Tensor mpe_embedding_bag_cuda(at::TensorList segments, c10::IntArrayRef bits,
                                  const at::Tensor& steps_in, const at::Tensor& beta_in,
                                  const at::Tensor& location_in, const at::Tensor& indices_in,
                                  const at::Tensor& offsets_in,
                                  const c10::optional<at::Tensor>& psw_in, int64_t mode,
                                  bool include_last_offset, at::ScalarType out_dtype) {
  const char* op = "qembed.mpe_embedding_bag: ";
  const int64_t num_out =
      check_mixed_lookup_args(segments, bits, steps_in, beta_in, location_in, indices_in,
                              offsets_in, psw_in, mode, include_last_offset, out_dtype);
  const int64_t num_segments = static_cast<int64_t>(segments.size());
  TORCH_CHECK_VALUE(num_segments <= kMaxSegments, op, "at most ", kMaxSegments,
                    " segments on CUDA, got ", num_segments);
  const c10::cuda::CUDAGuard guard(beta_in.device());
  const at::Tensor beta = beta_in.contiguous(), steps = steps_in.contiguous();
  const at::Tensor location = location_in.contiguous();
  const int64_t dim = beta.numel();
  MixedTable t{};
  std::vector<at::Tensor> keep;  // contiguous segments outlive the launch
  int64_t total = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    keep.push_back(segments[s].contiguous());
    total += keep.back().size(0);
    t.data[s] = keep.back().data_ptr<uint8_t>();
    t.stride[s] = keep.back().size(1);
    t.end[s] = total;
    t.bits[s] = static_cast<int>(bits[s]);
  }
  t.num_segments = static_cast<int>(num_segments);
  t.total = total;
  t.steps = steps.data_ptr<float>();
  t.beta = beta.data_ptr<float>();
  t.dim = dim;

  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t n = indices.numel();
  at::Tensor psw;
  if (psw_in.has_value()) psw = psw_in->to(at::kFloat).contiguous();
  at::Tensor offsets;
  if (mode != POOL_NONE) offsets = offsets_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty({num_out, dim}, beta.options().dtype(out_dtype));
  if (num_out == 0) return out;
  const bool validate = validate_on_host();
  const at::Tensor error =
      validate ? at::zeros({1}, beta.options().dtype(at::kInt)) : at::Tensor();
  int* err = validate ? error.data_ptr<int>() : nullptr;
  const float* w = psw.defined() ? psw.data_ptr<float>() : nullptr;
  const bool mean = mode == POOL_MEAN;
  const bool ranged = is_row_ranges(location);
  if (ranged && validate) {  // the CPU's checks of the ranges, on a copy
    std::vector<int64_t> ends(t.end, t.end + num_segments);
    const at::Tensor host = location.cpu();
    check_row_ranges(host.data_ptr<int32_t>(), host.size(0) - 1, ends);
  }
  if (ranged)
    launch_for_output(t, RowRanges{location.data_ptr<int32_t>(), location.size(0) - 1}, indices,
                      offsets, num_out, w, mean, err, out);
  else if (location.scalar_type() == at::kShort)
    launch_for_output(t, RowMap<int16_t>{location.data_ptr<int16_t>(), location.numel()},
                      indices, offsets, num_out, w, mean, err, out);
  else
    launch_for_output(t, RowMap<int32_t>{location.data_ptr<int32_t>(), location.numel()},
                      indices, offsets, num_out, w, mean, err, out);
  if (validate) {
    const int flags = error.item<int>();
    TORCH_CHECK_INDEX(!(flags & kBadIndex), op, "an index is out of range for the table");
    TORCH_CHECK_VALUE(!(flags & kBadParam), op, "a location is outside the segments (", total,
                      " rows)");
    TORCH_CHECK_VALUE(!(flags & kBadStep), op, "steps must be positive and finite");
    TORCH_CHECK_VALUE(!(flags & kBadOffsets), op, "offsets must start at 0, be non-decreasing ",
                      "and not pass the end of indices (", n, ")");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("mpe_embedding_bag", &mpe_embedding_bag_cuda); }

}  // namespace qembed
