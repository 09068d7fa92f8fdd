// Rounding a value given in code units to an integer code, shared by CPU and CUDA.
#pragma once
#include <cmath>
#include "layout.h"

namespace qembed {

// Random stream position of a stochastic rounding: the uniforms of row `row_key`, whose
// element d is element column_offset + d of the stream. row_offset is what a row index
// within the tensor adds to give its row_key (a shard's first row in the whole table).
struct RoundingKey {
  bool stochastic;
  uint64_t seed;
  uint64_t counter;
  uint64_t row_key;
  uint64_t row_offset = 0;
  int64_t column_offset = 0;  // a multiple of 8
};

QEMBED_ISA_BEGIN

// x: the value divided by its step (and shifted by its offset); u: a uniform in [0, 1).
// Stochastic rounding floor(x + u) is unbiased: E = x inside [lo, hi]. Nearest rounds
// half to even, as torch.round does.
QEMBED_HD int32_t round_to_code(float x, float u, bool stochastic, int32_t lo, int32_t hi) {
  const float r = stochastic ? floorf(x + u) : nearbyintf(x);
  // Comparisons rather than fminf/fmaxf, which compile to library calls on x86; NaN -> lo
  // as before.
  if (!(r >= static_cast<float>(lo))) return lo;
  return r > static_cast<float>(hi) ? hi : static_cast<int32_t>(r);
}

// Packs 8 codes (each < 2^BITS) into BITS bytes.
template <int BITS>
QEMBED_HD void pack_group(const uint32_t* codes, uint8_t* dst) {
  uint64_t x = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) x |= static_cast<uint64_t>(codes[i]) << (i * BITS);
  store_group<BITS>(dst, x);
}

QEMBED_ISA_END
}  // namespace qembed
