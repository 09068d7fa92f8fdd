// Bag boundaries, index checks and row prefetching shared by the lookups and the backward.
#pragma once
#include <c10/util/Exception.h>
#include <cstdint>
#include <algorithm>
#include <vector>

namespace qembed {

// Lookups prefetch the row this many positions ahead: a gather from a large table waits on
// memory, not on arithmetic.
constexpr int64_t kPrefetchDistance = 32;
// ... in bursts of this many rows, into the cache level kPrefetchLocality (the
// __builtin_prefetch hint: 3 = L1, 2 = L2). Machines disagree (measurements in
// benchmarks/README.md); the build targets its own CPU, so the vector width stands in for it.
#if defined(__AVX512F__)
constexpr int64_t kPrefetchBurst = 1;
constexpr int kPrefetchLocality = 2;
#else
constexpr int64_t kPrefetchBurst = 8;
constexpr int kPrefetchLocality = 3;
#endif

// Prefetches every cache line a row touches: its first, its last and, for rows of more than
// two lines, those between. Rows start at multiples of gcd(stride, 64) within a line (tables
// are 64-byte aligned), so the offset of the last line's prefetch is known per table: the
// last byte where that can lie in a further line than the last 64-byte step, else that step.
// Two straight prefetches rather than a loop: the loop's counters cost the lookup registers.
class RowPrefetch {
 public:
  explicit RowPrefetch(int64_t stride) {  // stride > 0
    const int64_t step = (stride - 1) / 64 * 64;
    // gcd(stride, 64) from the lowest set bit: std::gcd's loop ran once per bag
    const bool tail = (stride - 1) % 64 >= std::min<int64_t>(stride & -stride, 64);
    last_ = tail ? stride - 1 : step;
  }
  // Always inlined: GCC finds a prefetch free of side effects, so where it left this out of
  // line it dropped the calls as dead code (the mixed-width lookup lost its prefetches).
  __attribute__((always_inline)) void operator()(const uint8_t* row) const {
    __builtin_prefetch(row, 0, kPrefetchLocality);
    if (last_ > 0) __builtin_prefetch(row + last_, 0, kPrefetchLocality);
    for (int64_t off = 64; off < last_; off += 64)
      __builtin_prefetch(row + off, 0, kPrefetchLocality);
  }

 private:
  int64_t last_;
};

// For rows located long before they are prefetched (mixed-width lookups): the 64-byte lines
// the row at `row` touches, counted from its address, and their prefetch. Always inlined, as
// RowPrefetch.
inline int64_t lines_touched(const uint8_t* row, int64_t stride) {  // stride > 0
  return static_cast<int64_t>(((reinterpret_cast<uintptr_t>(row) & 63) + stride - 1) / 64 + 1);
}
__attribute__((always_inline)) inline void prefetch_lines(const uint8_t* row, int64_t lines) {
  const uint8_t* line = row - (reinterpret_cast<uintptr_t>(row) & 63);
  for (int64_t k = 0; k < lines; ++k) __builtin_prefetch(line + 64 * k, 0, kPrefetchLocality);
}

template <typename index_t>
void check_indices_in_range(const index_t* idx, int64_t n, int64_t num_rows) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < num_rows, "qembed.embedding_bag: index ",
                      static_cast<int64_t>(idx[i]), " at position ", i,
                      " is out of range for a table of ", num_rows, " rows");
}

// Bag b covers positions [starts[b], starts[b + 1]); returns starts with B + 1 entries.
template <typename offset_t>
std::vector<int64_t> bag_bounds(const offset_t* off, int64_t num_offsets, int64_t num_bags,
                                int64_t num_indices) {
  std::vector<int64_t> starts(num_bags + 1);
  for (int64_t b = 0; b < num_offsets; ++b) {
    const int64_t o = off[b];
    TORCH_CHECK_VALUE(b > 0 || o == 0, "qembed.embedding_bag: offsets[0] must be 0, got ", o);
    TORCH_CHECK_VALUE(b == 0 || o >= off[b - 1], "qembed.embedding_bag: offsets must be ",
                      "non-decreasing, but offsets[", b, "] = ", o, " < offsets[", b - 1,
                      "] = ", static_cast<int64_t>(off[b - 1]));
    TORCH_CHECK_VALUE(o <= num_indices, "qembed.embedding_bag: offsets[", b, "] = ", o,
                      " is past the end of indices (", num_indices, ")");
    if (b <= num_bags) starts[b] = o;
  }
  if (num_offsets == num_bags) starts[num_bags] = num_indices;
  return starts;
}

// The bag of each position in [0, starts.back()); positions past the last bag belong to none
// (with no bags at all, none does).
inline std::vector<int64_t> bag_of_positions(const std::vector<int64_t>& starts) {
  std::vector<int64_t> bag(starts.size() > 1 ? starts.back() : 0);
  for (size_t b = 0; b + 1 < starts.size(); ++b)
    for (int64_t p = starts[b]; p < starts[b + 1]; ++p) bag[p] = static_cast<int64_t>(b);
  return bag;
}

}  // namespace qembed
