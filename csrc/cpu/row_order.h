// Ordering a batch's positions by row, repeats kept in batch order: the backward ops' first
// step, so that each distinct row is summed by one thread in a fixed order.
#pragma once
#include <c10/util/Exception.h>
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace qembed {

// Positions [0, n) ordered by key, equal keys in position order, with their keys: an LSD
// radix sort with only as many 11-bit digits as the largest key needs. Where a key and a
// position fit one 64-bit word together (keys below 2^40 for a million positions) the sort
// moves (key, position) words, so each pass streams one array; otherwise positions, each
// pass reading its key through the position. Sequential on purpose: the batch is small, and
// a sort split over threads (torch.sort's) stalls at every pass when the machine is
// oversubscribed.
struct SortedPositions {
  std::vector<int64_t> pos, key;
};

inline SortedPositions sorted_positions(const int64_t* key, int64_t n) {
  constexpr int kDigitBits = 11;
  constexpr int64_t kRadix = int64_t{1} << kDigitBits;
  int64_t max_key = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(key[i] >= 0, "qembed: negative index ", key[i],
                      " at position ", i);
    max_key = std::max(max_key, key[i]);
  }
  const int key_bits = 64 - __builtin_clzll(static_cast<uint64_t>(max_key) | 1);
  const int pos_bits = 64 - __builtin_clzll(static_cast<uint64_t>(std::max<int64_t>(n - 1, 1)));
  std::vector<int64_t> count(kRadix + 1);
  SortedPositions out{std::vector<int64_t>(n), std::vector<int64_t>(n)};
  if (key_bits + pos_bits <= 64) {
    std::vector<uint64_t> word(n), next(n);
    for (int64_t i = 0; i < n; ++i)
      word[i] = static_cast<uint64_t>(key[i]) << pos_bits | static_cast<uint64_t>(i);
    for (int shift = pos_bits; shift < pos_bits + key_bits; shift += kDigitBits) {
      std::fill(count.begin(), count.end(), 0);
      for (int64_t i = 0; i < n; ++i) ++count[((word[i] >> shift) & (kRadix - 1)) + 1];
      std::partial_sum(count.begin(), count.end(), count.begin());
      for (int64_t i = 0; i < n; ++i) next[count[(word[i] >> shift) & (kRadix - 1)]++] = word[i];
      word.swap(next);
    }
    const uint64_t pos_mask = (uint64_t{1} << pos_bits) - 1;
    for (int64_t j = 0; j < n; ++j) {
      out.pos[j] = static_cast<int64_t>(word[j] & pos_mask);
      out.key[j] = static_cast<int64_t>(word[j] >> pos_bits);
    }
    return out;
  }
  std::vector<int64_t>& order = out.pos;
  std::vector<int64_t> next(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  for (int shift = 0; shift < key_bits; shift += kDigitBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[((key[i] >> shift) & (kRadix - 1)) + 1];
    std::partial_sum(count.begin(), count.end(), count.begin());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = order[i];
      next[count[(key[p] >> shift) & (kRadix - 1)]++] = p;
    }
    order.swap(next);
  }
  for (int64_t j = 0; j < n; ++j) out.key[j] = key[order[j]];
  return out;
}

}  // namespace qembed
