// Encoding fp32 rows to codes and decoding codes into fp32 accumulators, for the CPU
// kernels. Both follow layout.h; the arithmetic order matches qembed/reference.py.
#pragma once
#include "../layout.h"
#include "../philox.h"
#include "../rounding.h"

namespace qembed {

// Random stream position of a stochastic rounding: the uniforms of row `row_key`.
struct RoundingKey {
  bool stochastic;
  uint64_t seed;
  uint64_t counter;
  uint64_t row_key;
};

// codes[g] of `dim` values: x = (w - bias) / scale, rounded into [offset, offset + 2^b - 1].
template <int BITS>
inline void encode_row(const float* w, int64_t dim, const RowParams& p, const RoundingKey& k,
                       uint8_t* codes) {
  const int32_t lo = p.offset, hi = p.offset + static_cast<int32_t>(code_mask(BITS));
  uint32_t group[8];
  float u[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t g = 0; g < dim / 8; ++g) {
    if (k.stochastic) {
      for (int half = 0; half < 2; ++half) {
        const Philox4 r = sr_block(k.seed, k.counter, k.row_key, 2 * g + half);
        for (int j = 0; j < 4; ++j) u[4 * half + j] = uniform_from_bits(r.v[j]);
      }
    }
    for (int i = 0; i < 8; ++i) {
      const float x = (w[g * 8 + i] - p.bias) / p.scale;
      group[i] = static_cast<uint32_t>(round_to_code(x, u[i], k.stochastic, lo, hi) - lo);
    }
    pack_group<BITS>(group, codes + g * BITS);
  }
}

// acc[d] += a * (code_d + offset) + c, i.e. the row's values scaled by a/scale.
template <int BITS>
inline void accumulate_row(const uint8_t* codes, int64_t dim, float a, float c, int32_t offset,
                           float* __restrict acc) {
  if constexpr (BITS == 8) {
    for (int64_t d = 0; d < dim; ++d)
      acc[d] += a * static_cast<float>(static_cast<int32_t>(codes[d]) + offset) + c;
  } else if constexpr (BITS == 4) {
    for (int64_t j = 0; j < dim / 2; ++j) {
      const int32_t byte = codes[j];
      acc[2 * j] += a * static_cast<float>((byte & 15) + offset) + c;
      acc[2 * j + 1] += a * static_cast<float>((byte >> 4) + offset) + c;
    }
  } else {
    for (int64_t g = 0; g < dim / 8; ++g) {
      const uint64_t x = load_group<BITS>(codes + g * BITS);
      for (int i = 0; i < 8; ++i)
        acc[g * 8 + i] +=
            a * static_cast<float>(static_cast<int32_t>(group_code<BITS>(x, i)) + offset) + c;
    }
  }
}

}  // namespace qembed
