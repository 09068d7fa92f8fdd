// Row prefetching for the lookups (cpu/isa/): how far ahead, in what bursts, which lines.
#pragma once
#include <algorithm>
#include <cstdint>
#include "../isa_namespace.h"

namespace qembed {
QEMBED_ISA_BEGIN

// Lookups prefetch the row this many positions ahead: a gather from a large table waits on
// memory, not on arithmetic.
constexpr int64_t kPrefetchDistance = 32;
// ... in bursts of this many rows, into the cache level kPrefetchLocality (the
// __builtin_prefetch hint: 3 = L1, 2 = L2). Machines disagree (measurements in
// benchmarks/README.md); the kernel variant's vector width stands in for the machine.
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

QEMBED_ISA_END
}  // namespace qembed
