// Ordering a batch's positions by row, repeats kept in batch order: the backward ops' first
// step, so that each distinct row is summed by one thread in a fixed order.
#pragma once
#include <c10/util/Exception.h>
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace qembed {

// Positions [0, n) ordered by key, equal keys in position order: an LSD radix sort with only
// as many passes as the largest key needs. Sequential on purpose: the batch is small, and a
// sort split over threads (torch.sort's) stalls at every pass when the machine is
// oversubscribed.
inline std::vector<int64_t> stable_order(const int64_t* key, int64_t n) {
  constexpr int kDigitBits = 11;
  constexpr int64_t kRadix = int64_t{1} << kDigitBits;
  int64_t max_key = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(key[i] >= 0, "qembed: negative index ", key[i], " at position ", i);
    max_key = std::max(max_key, key[i]);
  }
  std::vector<int64_t> order(n), next(n), count(kRadix + 1);
  std::iota(order.begin(), order.end(), int64_t{0});
  for (int shift = 0; shift < 63 && (max_key >> shift) > 0; shift += kDigitBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[((key[i] >> shift) & (kRadix - 1)) + 1];
    std::partial_sum(count.begin(), count.end(), count.begin());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = order[i];
      next[count[(key[p] >> shift) & (kRadix - 1)]++] = p;
    }
    order.swap(next);
  }
  return order;
}

}  // namespace qembed
