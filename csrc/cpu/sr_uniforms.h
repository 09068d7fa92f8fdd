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

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

#if defined(__AVX512F__)
// (hi, lo) of the 32 x 32-bit products a * m in each lane.
inline __attribute__((always_inline)) void mulhilo_lanes(__m512i a, __m512i m, __m512i& hi,
                                                         __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// uniforms of elements 4 * quad .. 4 * quad + 63 (16 blocks from `quad`) into u[0..64).
inline void sr_uniforms_pass(uint32_t k0, uint32_t k1, uint64_t counter, uint64_t row,
                             uint32_t quad, float* u) {
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(quad)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                  14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row >> 32)));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter)));
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo_lanes(c0, m0, hi0, lo0);
    mulhilo_lanes(c2, m1, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Word j of block i is element 4i + j: a 4 x 16 transpose, within 128-bit lanes first.
  const __m512 scale = _mm512_set1_ps(1.0f / 16777216.0f);
  auto uniform = [&](__m512i x) {
    return _mm512_castps_si512(
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x, 8)), scale));
  };
  const __m512i v0 = uniform(c0), v1 = uniform(c1), v2 = uniform(c2), v3 = uniform(c3);
  const __m512i t0 = _mm512_unpacklo_epi32(v0, v1), t1 = _mm512_unpackhi_epi32(v0, v1);
  const __m512i t2 = _mm512_unpacklo_epi32(v2, v3), t3 = _mm512_unpackhi_epi32(v2, v3);
  // s_j holds block 4l + j in its 128-bit lane l
  const __m512i s0 = _mm512_unpacklo_epi64(t0, t2), s1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i s2 = _mm512_unpacklo_epi64(t1, t3), s3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i a = _mm512_shuffle_i32x4(s0, s1, 0x44), b = _mm512_shuffle_i32x4(s2, s3, 0x44);
  const __m512i c = _mm512_shuffle_i32x4(s0, s1, 0xEE), d = _mm512_shuffle_i32x4(s2, s3, 0xEE);
  _mm512_storeu_si512(u, _mm512_shuffle_i32x4(a, b, 0x88));
  _mm512_storeu_si512(u + 16, _mm512_shuffle_i32x4(a, b, 0xDD));
  _mm512_storeu_si512(u + 32, _mm512_shuffle_i32x4(c, d, 0x88));
  _mm512_storeu_si512(u + 48, _mm512_shuffle_i32x4(c, d, 0xDD));
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

}  // namespace qembed
