// Device code shared by the CUDA kernels: sums in the CPU's orders, bags of positions,
// decoding a group of 8 codes.
#pragma once
#include <cstdint>
#include "../layout.h"
#include "launch.cuh"

namespace qembed {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBadIndex = 1, kBadOffsets = 2, kBadOrder = 4, kBadParam = 8;  // error flags

// The sum of a row's terms strictly in element order starting from 0.0f, as the CPU's
// serial loops and the reference's _seq_sum add them. The row is `groups` groups of 8
// terms; lane l fills the terms of groups l, l + 32, ... with term(group, float (&t)[8]);
// every lane adds them all in order (one shuffle per term) and returns the same sum.
// Whole warps call it.
template <typename Term>
__device__ __forceinline__ float ordered_sum(int64_t groups, int lane, Term&& term) {
  float acc = 0.0f;
  for (int64_t base = 0; base < groups; base += kWarp) {
    float t[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (base + lane < groups) term(base + lane, t);
    const int m = groups - base < kWarp ? static_cast<int>(groups - base) : kWarp;
    for (int l = 0; l < m; ++l) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc += __shfl_sync(kFullMask, t[i], l);
    }
  }
  return acc;
}

// The sum of a row's terms in the update's order (optim.h, kSumLanes): partial j of 16 adds
// elements j, j + 16, ... from the left, then the upper half of the partials is added onto
// the lower, 16 -> 8 -> 4 -> 2 -> 1. The row is `groups` groups of 8 terms, lane l filling
// those of groups l, l + 32, ... with term(group, float (&t)[8]); group g's terms go to
// partials 8 * (g % 2) + i. Every lane adds them all (one shuffle per term) and returns the
// same sum. Whole warps call it.
template <typename Term>
__device__ __forceinline__ float lane_sum(int64_t groups, int lane, Term&& term) {
  float acc[2][8] = {};
  for (int64_t base = 0; base < groups; base += kWarp) {  // kWarp is even: g % 2 == l % 2
    float t[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (base + lane < groups) term(base + lane, t);
    const int m = groups - base < kWarp ? static_cast<int>(groups - base) : kWarp;
    for (int l = 0; l < m; l += 2) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[0][i] += __shfl_sync(kFullMask, t[i], l);
      if (l + 1 < m) {
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[1][i] += __shfl_sync(kFullMask, t[i], l + 1);
      }
    }
  }
  float h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = acc[0][i] + acc[1][i];
#pragma unroll
  for (int n = 4; n >= 1; n /= 2) {
#pragma unroll
    for (int i = 0; i < n; ++i) h[i] = h[i] + h[i + n];
  }
  return h[0];
}

// The bag of position p: the last b with offsets[b] <= p, or -1 when p is in no bag (before
// offsets[0], or past the last bag's end with include_last_offset, where num_offsets =
// num_bags + 1). Bad offsets give some bag in range or -1, never a read out of bounds.
__device__ __forceinline__ int64_t bag_of_position(int64_t p, const int64_t* offsets,
                                                   int64_t num_offsets, int64_t num_bags) {
  int64_t lo = 0, hi = num_offsets;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= p)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo - 1 < num_bags ? lo - 1 : -1;
}

// Positions [start, end) of bag b (the last bag ends at n unless include_last_offset gave
// num_offsets = num_bags + 1), clamped into [0, n] so bad offsets are never read through;
// returns whether the bag's offsets break the rules.
__device__ __forceinline__ bool bag_range(const int64_t* offsets, int64_t num_offsets, int64_t b,
                                          int64_t n, int64_t& start, int64_t& end) {
  start = offsets[b];
  end = b + 1 < num_offsets ? offsets[b + 1] : n;
  const bool bad = (b == 0 && start != 0) || start < 0 || end < start || end > n;
  start = start < 0 ? 0 : (start > n ? n : start);
  end = end < start ? start : (end > n ? n : end);
  return bad;
}

// Whether offsets[b] breaks the rules: start at 0, non-decreasing, not past n.
__device__ __forceinline__ bool bad_offset(const int64_t* offsets, int64_t b, int64_t n) {
  const int64_t o = offsets[b];
  return (b == 0 && o != 0) || (b > 0 && o < offsets[b - 1]) || o > n;
}

// The values of group gi of a row's codes: 0 + (scale * (code + offset) + bias), rounded as
// the CPU's accumulate_row rounds them into a zeroed buffer.
template <int BITS>
__device__ __forceinline__ void decode_group(const uint8_t* codes, int64_t gi, const RowParams& p,
                                             float (&v)[8]) {
  const uint64_t x = load_group<BITS>(codes + gi * BITS);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int32_t q = static_cast<int32_t>(group_code<BITS>(x, i)) + p.offset;
    v[i] = 0.0f + (p.scale * static_cast<float>(q) + p.bias);
  }
}

}  // namespace qembed
