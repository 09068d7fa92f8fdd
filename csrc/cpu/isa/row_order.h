// The backward ops' sort of a batch's positions by row (the kernel of cpu/row_order.h), one
// per instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"

namespace qembed {

// An LSD radix sort takes digits of this many bits: count holds kSortRadix + 1 entries.
constexpr int kSortDigitBits = 11;
constexpr int64_t kSortRadix = int64_t{1} << kSortDigitBits;

// Bits needed to write x (at least one).
inline int bit_width(uint64_t x) { return 64 - __builtin_clzll(x | 1); }

// words[0, n), each a key in bits [shift, shift + key_bits) above a position below, ordered
// by key, equal keys in the order they come: returns the buffer that holds them sorted, words
// or scratch (n words). count holds kSortRadix + 1.
QEMBED_DECLARE_CPU_KERNEL(uint64_t* sort_words(uint64_t* words, uint64_t* scratch, int64_t n,
                                               int shift, int key_bits, int64_t* count))

// Positions [0, n) ordered by key[p] (each in [0, max_key]), equal keys in position order,
// into pos[0, n) with their keys in sorted_key[0, n). scratch holds 2n words, count
// kSortRadix + 1.
QEMBED_DECLARE_CPU_KERNEL(void sort_positions(const int64_t* key, int64_t n, int64_t max_key,
                                              uint64_t* scratch, int64_t* count, int64_t* pos,
                                              int64_t* sorted_key))

}  // namespace qembed
