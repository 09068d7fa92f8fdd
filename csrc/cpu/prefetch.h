// Row prefetching for the lookups (cpu/isa/): how far ahead, in what bursts, which lines.
#pragma once
#include <algorithm>
#include <cstdint>
#include "../isa_namespace.h"

namespace qembed {
QEMBED_ISA_BEGIN

// Lookups prefetch the row this many positions ahead: a gather from a large table waits on
// memory, not on arithmetic. 32 rather than 16: int8 Zipf lookups into 4M rows ran ~10%
// faster relative to torch.ops.quantized's (8 was slower, 48 no better).
constexpr int64_t kPrefetchDistance = 32;
// ... and in bursts of this many rows, into the cache level kPrefetchLocality (the
// __builtin_prefetch hint: 3 = L1, prefetcht0; 2 = L2, prefetcht1). Machines disagree. On
// Zen 3 (AVX2) out of cache each prefetch waited for a free miss buffer, and one per row
// left too few in the out-of-order window to take the buffers as they freed: int8 lookups
// ran 10-20% and mixed-width ones ~20% faster in bursts of 8 (16 no better). On Zen 4
// (AVX-512) bursts of 8 made the int8 and int4 lookups 15-25% slower than one prefetch per
// row (4M rows, 1 thread), and prefetching into L2 instead of L1 made int8 lookups 1.1x
// (D = 128) to 1.6x (D = 64) and int4 ones 1.5x faster (4M rows on huge pages, 2 threads).
// L2 prefetches are not measured on AVX2 machines. The kernel variant's vector width stands
// in for the machine.
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
// Redundant prefetches are not free: for 136-byte int8 rows they cost about 10%. Two
// straight prefetches rather than a loop over the row: with the loop's counters the int8
// lookup ran out of registers, 10% slower at D = 64 and 25% at D = 128 (4M rows, Zen 3).
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
