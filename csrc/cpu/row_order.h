// Ordering a batch's positions by row, repeats kept in batch order: the backward ops' first
// step, so that each distinct row is summed by one thread in a fixed order. The keys are
// checked here; the radix sort is a kernel (isa/row_order.cpp). Sequential on purpose: the
// batch is small, and a sort split over threads (torch.sort's) stalls at every pass when the
// machine is oversubscribed.
#pragma once
#include <c10/util/Exception.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#include "isa/row_order.h"

namespace qembed {

struct SortedPositions {
  std::vector<int64_t> pos, key;
};

// Positions [0, n) ordered by key, equal keys in position order, with their keys.
inline SortedPositions sorted_positions(const int64_t* key, int64_t n) {
  int64_t max_key = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(key[i] >= 0, "qembed: negative index ", key[i], " at position ", i);
    max_key = std::max(max_key, key[i]);
  }
  SortedPositions out{std::vector<int64_t>(n), std::vector<int64_t>(n)};
  std::vector<uint64_t> scratch(2 * n);
  std::vector<int64_t> count(kSortRadix + 1);
  QEMBED_CPU_KERNEL(sort_positions)(key, n, max_key, scratch.data(), count.data(),
                                    out.pos.data(), out.key.data());
  return out;
}

}  // namespace qembed
