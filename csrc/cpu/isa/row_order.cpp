// The backward ops' sort of positions by row (cpu/row_order.h), for one instruction set
// (compiled once per variant, dispatch.h): an LSD radix sort with only as many digits as the
// largest key needs. Where a key and a position fit one 64-bit word together (keys below 2^40
// for a million positions) the sort moves (key, position) words, so each pass streams one
// array (sort_words, which the many-table backward calls on the words it builds as it reads
// the ids); otherwise positions, each pass reading its key through the position.
#include "row_order.h"
#include <algorithm>
#include <utility>

namespace qembed {
QEMBED_ISA_BEGIN
namespace {

// count[0, radix] <- the exclusive prefix sums of the digit counts of values(i) >> shift.
template <typename F>
void digit_starts(int64_t n, int shift, int64_t radix, int64_t* count, F&& values) {
  for (int64_t d = 0; d <= radix; ++d) count[d] = 0;
  for (int64_t i = 0; i < n; ++i) ++count[((values(i) >> shift) & (radix - 1)) + 1];
  for (int64_t d = 1; d <= radix; ++d) count[d] += count[d - 1];
}

// The width of each digit for keys of key_bits: equal widths, as few digits as
// kSortDigitBits allows, so a table of a few rows takes one pass over a histogram of a few
// buckets rather than kSortRadix.
int digit_width(int key_bits) {
  const int passes = std::max(1, (key_bits + kSortDigitBits - 1) / kSortDigitBits);
  return (key_bits + passes - 1) / passes;
}

}  // namespace

uint64_t* sort_words(uint64_t* words, uint64_t* scratch, int64_t n, int shift, int key_bits,
                     int64_t* count) {
  const int digit_bits = digit_width(key_bits);
  const int64_t radix = int64_t{1} << digit_bits;
  uint64_t* word = words;
  uint64_t* next = scratch;
  for (int digit = shift; digit < shift + key_bits; digit += digit_bits) {
    digit_starts(n, digit, radix, count, [&](int64_t i) { return word[i]; });
    for (int64_t i = 0; i < n; ++i) next[count[(word[i] >> digit) & (radix - 1)]++] = word[i];
    std::swap(word, next);
  }
  return word;
}

void sort_positions(const int64_t* key, int64_t n, int64_t max_key, uint64_t* scratch,
                    int64_t* count, int64_t* pos, int64_t* sorted_key) {
  const int key_bits = bit_width(static_cast<uint64_t>(max_key));
  const int pos_bits = bit_width(static_cast<uint64_t>(n > 1 ? n - 1 : 1));
  if (key_bits + pos_bits <= 64) {
    for (int64_t i = 0; i < n; ++i)
      scratch[i] = static_cast<uint64_t>(key[i]) << pos_bits | static_cast<uint64_t>(i);
    const uint64_t* word = sort_words(scratch, scratch + n, n, pos_bits, key_bits, count);
    const uint64_t pos_mask = (uint64_t{1} << pos_bits) - 1;
    for (int64_t j = 0; j < n; ++j) {
      pos[j] = static_cast<int64_t>(word[j] & pos_mask);
      sorted_key[j] = static_cast<int64_t>(word[j] >> pos_bits);
    }
    return;
  }
  // Positions in scratch's halves (int64 and uint64 may alias each other).
  int64_t* order = reinterpret_cast<int64_t*>(scratch);
  int64_t* next = reinterpret_cast<int64_t*>(scratch + n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  const int digit_bits = digit_width(key_bits);
  const int64_t radix = int64_t{1} << digit_bits;
  for (int shift = 0; shift < key_bits; shift += digit_bits) {
    digit_starts(n, shift, radix, count,
                 [&](int64_t i) { return static_cast<uint64_t>(key[i]); });
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = order[i];
      next[count[(key[p] >> shift) & (radix - 1)]++] = p;
    }
    int64_t* sorted = next;
    next = order;
    order = sorted;
  }
  for (int64_t j = 0; j < n; ++j) {
    pos[j] = order[j];
    sorted_key[j] = key[order[j]];
  }
}

QEMBED_ISA_END
}  // namespace qembed
