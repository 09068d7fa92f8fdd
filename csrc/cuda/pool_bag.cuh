// Pooling one bag of packed rows with one warp: what the single-table lookup
// (embedding_bag.cu) and the many-table one (embedding_bags.cu) share. See embedding_bag.cu
// for the layout of the work (units, lanes per row, rows per warp).
#pragma once
#include <cstdint>
#include "../layout.h"
#include "common.cuh"
#include "launch.cuh"

namespace qembed {

constexpr unsigned kAll = 0xffffffffu;

template <int BITS>
struct Unit {
  static constexpr int kGcd = BITS % 4 == 0 ? 4 : (BITS % 2 == 0 ? 2 : 1);
  static constexpr int kWords = BITS / kGcd;
  static constexpr int kCodes = 32 / kGcd;
  static constexpr int kPerLane = 32 / kCodes;  // units per lane and chunk: 32 codes
};

// Lanes per row: the fewest that cover a row's units with kPerLane units each.
__host__ __device__ inline int lanes_per_row(int64_t units, int per_lane) {
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

// One warp pools positions [start, end) of idx (clamped into the indices) into dst[0, dim):
// `lanes` lanes per row (lanes_per_row), 32 / lanes rows at once.
template <int BITS, typename index_t, typename out_t>
__device__ __forceinline__ void pool_bag_warp(const Table& t, const index_t* __restrict__ idx,
                                              int64_t start, int64_t end,
                                              const float* __restrict__ psw, bool mean,
                                              int lanes, int* error, out_t* __restrict__ dst) {
  using U = Unit<BITS>;
  const int lane = threadIdx.x % kWarp, sub = lane % lanes, group = lane / lanes;
  const int groups = kWarp / lanes;
  const float table_step = t.fmt == SYM_TABLE ? *t.step : 0.0f;
  const int64_t units = (t.dim + U::kCodes - 1) / U::kCodes;
  const int64_t code_words = param_offset(t.dim, BITS) / 4;
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

}  // namespace qembed
