// The stochastic-rounding uniforms of a whole row (philox.h's stream) in SIMD lanes: one
// Philox block per 32-bit lane, 16 blocks (64 uniforms) per pass with AVX-512, two sets of 8
// with AVX2, the scalar sr_block otherwise. Every lane runs the same ten rounds as sr_block, so
// the bits are those of the scalar, CUDA and reference generators.
#pragma once
#include "../philox.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstring>

namespace qembed {
QEMBED_ISA_BEGIN

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

#if defined(__AVX512F__)
// uniforms of elements 4 * quad .. 4 * quad + 63 (16 blocks from `quad`) into u[0..64).
// Each block's words sit in the low halves of 64-bit lanes, eight blocks to a register: one
// widening multiply then gives a word's whole product, its low word in place for the next
// round and its high word one shift away, and the output's transpose starts from word pairs
// in 64-bit lanes. The high halves carry junk that no multiply reads. (One block per 32-bit
// lane, two multiplies and two merges a product: 42 against 32 ns a row of 64, Zen 4.)
inline void sr_uniforms_pass(uint32_t k0, uint32_t k1, uint64_t counter, uint64_t row,
                             uint32_t quad, float* u) {
  // a: blocks quad .. quad + 7, b: quad + 8 .. quad + 15
  __m512i a0 = _mm512_add_epi64(_mm512_set1_epi64(quad), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  __m512i b0 = _mm512_add_epi64(a0, _mm512_set1_epi64(8));
  __m512i a1 = _mm512_set1_epi64(static_cast<uint32_t>(row)), b1 = a1;
  __m512i a2 = _mm512_set1_epi64(static_cast<uint32_t>(row >> 32)), b2 = a2;
  __m512i a3 = _mm512_set1_epi64(static_cast<uint32_t>(counter)), b3 = a3;
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  constexpr int kXor3 = 0x96;  // ternary logic: x ^ y ^ z
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    const __m512i pa0 = _mm512_mul_epu32(a0, m0), pa2 = _mm512_mul_epu32(a2, m1);
    const __m512i pb0 = _mm512_mul_epu32(b0, m0), pb2 = _mm512_mul_epu32(b2, m1);
    a0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pa2, 32), a1, key0, kXor3);
    b0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pb2, 32), b1, key0, kXor3);
    a2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pa0, 32), a3, key1, kXor3);
    b2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pb0, 32), b3, key1, kXor3);
    a1 = pa2;
    b1 = pb2;
    a3 = pa0;
    b3 = pb0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Element 4i + j is word j of block i: words 0 and 1 of a block paired in one 64-bit lane,
  // words 2 and 3 in another, then those pairs interleaved, four blocks to a register.
  const __m512i a01 = _mm512_mask_shuffle_epi32(a0, 0xAAAA, a1, _MM_PERM_CDAB);
  const __m512i a23 = _mm512_mask_shuffle_epi32(a2, 0xAAAA, a3, _MM_PERM_CDAB);
  const __m512i b01 = _mm512_mask_shuffle_epi32(b0, 0xAAAA, b1, _MM_PERM_CDAB);
  const __m512i b23 = _mm512_mask_shuffle_epi32(b2, 0xAAAA, b3, _MM_PERM_CDAB);
  const __m512i first = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i second = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512 scale = _mm512_set1_ps(1.0f / 16777216.0f);
  auto store_uniforms = [&](float* out, __m512i x) {
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x, 8)), scale));
  };
  store_uniforms(u, _mm512_permutex2var_epi64(a01, first, a23));
  store_uniforms(u + 16, _mm512_permutex2var_epi64(a01, second, a23));
  store_uniforms(u + 32, _mm512_permutex2var_epi64(b01, first, b23));
  store_uniforms(u + 48, _mm512_permutex2var_epi64(b01, second, b23));
}
#elif defined(__AVX2__)
inline __attribute__((always_inline)) void mulhilo_lanes(__m256i a, __m256i m, __m256i& hi,
                                                         __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(a, m);
}

// uniforms of elements 4 * quad .. 4 * quad + 32 * SETS - 1 (8 * SETS blocks from `quad`)
// into u. Two sets of 8 blocks run interleaved: one set's rounds are a chain of dependent
// multiplies, and two chains side by side took 0.75-0.85x the time of one after the other
// (Zen 3).
template <int SETS>
inline void sr_uniforms_pass(uint32_t k0, uint32_t k1, uint64_t counter, uint64_t row,
                             uint32_t quad, float* u) {
  __m256i c0[SETS], c1[SETS], c2[SETS], c3[SETS];
  for (int p = 0; p < SETS; ++p) {
    c0[p] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(quad + 8 * p)),
                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    c1[p] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
    c2[p] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(row >> 32)));
    c3[p] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter)));
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int p = 0; p < SETS; ++p) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_lanes(c0[p], m0, hi0, lo0);
      mulhilo_lanes(c2[p], m1, hi1, lo1);
      c0[p] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[p]), key0);
      c1[p] = lo1;
      c2[p] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[p]), key1);
      c3[p] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Word j of block i is element 4i + j: a 4 x 8 transpose, within 128-bit lanes first.
  const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f);
  auto uniform = [&](__m256i x) {
    return _mm256_castps_si256(
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)), scale));
  };
  for (int p = 0; p < SETS; ++p) {
    const __m256i v0 = uniform(c0[p]), v1 = uniform(c1[p]);
    const __m256i v2 = uniform(c2[p]), v3 = uniform(c3[p]);
    const __m256i t0 = _mm256_unpacklo_epi32(v0, v1), t1 = _mm256_unpackhi_epi32(v0, v1);
    const __m256i t2 = _mm256_unpacklo_epi32(v2, v3), t3 = _mm256_unpackhi_epi32(v2, v3);
    // s_j holds block j in its low 128-bit lane, block 4 + j in its high one
    const __m256i s0 = _mm256_unpacklo_epi64(t0, t2), s1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i s2 = _mm256_unpacklo_epi64(t1, t3), s3 = _mm256_unpackhi_epi64(t1, t3);
    auto* out = reinterpret_cast<__m256i*>(u + 32 * p);
    _mm256_storeu_si256(out, _mm256_permute2x128_si256(s0, s1, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(s2, s3, 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(s0, s1, 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(s2, s3, 0x31));
  }
}
#endif

// u[i] for i in [0, n): the uniform of element first + i of `row` at (seed, counter);
// first and n multiples of 4.
inline void sr_uniforms(uint64_t seed, uint64_t counter, uint64_t row, int64_t first, int64_t n,
                        float* u) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__AVX512F__)
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    sr_uniforms_pass(k0, k1, counter, row, static_cast<uint32_t>((first + i) / 4), u + i);
  if (i < n) {
    alignas(64) float tail[64];
    sr_uniforms_pass(k0, k1, counter, row, static_cast<uint32_t>((first + i) / 4), tail);
    std::memcpy(u + i, tail, (n - i) * sizeof(float));
  }
#elif defined(__AVX2__)
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    sr_uniforms_pass<2>(k0, k1, counter, row, static_cast<uint32_t>((first + i) / 4), u + i);
  if (i + 32 == n) {
    sr_uniforms_pass<1>(k0, k1, counter, row, static_cast<uint32_t>((first + i) / 4), u + i);
  } else if (i < n) {
    alignas(32) float tail[64];
    if (n - i <= 32)
      sr_uniforms_pass<1>(k0, k1, counter, row, static_cast<uint32_t>((first + i) / 4), tail);
    else
      sr_uniforms_pass<2>(k0, k1, counter, row, static_cast<uint32_t>((first + i) / 4), tail);
    std::memcpy(u + i, tail, (n - i) * sizeof(float));
  }
#else
  for (int64_t q = 0; q < n / 4; ++q) {
    const Philox4 r = sr_block(seed, counter, row, static_cast<uint64_t>(first / 4 + q));
    for (int j = 0; j < 4; ++j) u[4 * q + j] = uniform_from_bits(r.v[j]);
  }
#endif
}

QEMBED_ISA_END
}  // namespace qembed
