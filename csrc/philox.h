// Counter-based random numbers for stochastic rounding, written once for CPU and CUDA.
//
// Philox4x32-10 (Salmon et al., SC'11). The uniform for element d of row r at update
// counter t under seed s comes from the block with
//   counter = (d / 4, r mod 2^32, r / 2^32, t mod 2^32), key = (s mod 2^32, s / 2^32)
// taking output word d % 4, so it depends on nothing but (s, t, r, d): not on thread
// count, launch shape or device. r and d are the row and element in the whole table: a
// shard holding rows or columns of it passes their offsets (RoundingKey), so it draws the
// uniforms the whole table would. qembed/reference.py computes the same stream in torch.
#pragma once
#include "layout.h"

namespace qembed {

struct Philox4 {
  uint32_t v[4];
};

QEMBED_ISA_BEGIN

QEMBED_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

QEMBED_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c.v[0], hi0, lo0);
    mulhilo32(0xCD9E8D57u, c.v[2], hi1, lo1);
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// The four uniforms in [0, 1) for elements 4*quad .. 4*quad+3 of `row`.
QEMBED_HD Philox4 sr_block(uint64_t seed, uint64_t counter, uint64_t row, uint64_t quad) {
  const Philox4 c{{static_cast<uint32_t>(quad), static_cast<uint32_t>(row),
                   static_cast<uint32_t>(row >> 32), static_cast<uint32_t>(counter)}};
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// 24 random bits -> an fp32 uniform in [0, 1), exact in fp32.
QEMBED_HD float uniform_from_bits(uint32_t x) {
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}

QEMBED_ISA_END
}  // namespace qembed
