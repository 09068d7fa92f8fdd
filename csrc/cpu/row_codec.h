// Encoding fp32 rows to codes and decoding codes into fp32 accumulators, for the CPU
// kernels. Both follow layout.h; the arithmetic order matches qembed/reference.py.
#pragma once
#include "../layout.h"
#include "../philox.h"
#include "../rounding.h"
#include "lanes.h"
#include "sr_uniforms.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cstring>

namespace qembed {

// The rest differs per instruction set (the accumulators' types too), so it lies in the
// variant's namespace (isa_namespace.h).
QEMBED_ISA_BEGIN

// acc.add<bits>(codes, a) for a width known at run time. A plain switch: GCC left
// QEMBED_DISPATCH_BITS's lambda out of line, and the call per row made mixed-width lookups
// ~3x slower.
template <typename Acc>
QEMBED_INLINE void add_at_width(Acc& acc, const uint8_t* codes, int bits, float a) {
  switch (bits) {
    case 1: return acc.template add<1>(codes, a);
    case 2: return acc.template add<2>(codes, a);
    case 3: return acc.template add<3>(codes, a);
    case 4: return acc.template add<4>(codes, a);
    case 5: return acc.template add<5>(codes, a);
    case 6: return acc.template add<6>(codes, a);
    case 7: return acc.template add<7>(codes, a);
    default: return acc.template add<8>(codes, a);
  }
}

// Packs groups of 8 codes, one per byte of x (each < 2^BITS), into the group's BITS * 8
// bits: pairs, then quads, then the eight, each step closing the gaps of the last.
template <int BITS>
QEMBED_INLINE uint64_t pack_code_bytes(uint64_t x) {
  if constexpr (BITS < 8) {
    x = (x & 0x00FF00FF00FF00FFull) | ((x & 0xFF00FF00FF00FF00ull) >> (8 - BITS));
    x = (x & 0x0000FFFF0000FFFFull) | ((x & 0xFFFF0000FFFF0000ull) >> (16 - 2 * BITS));
    x = (x & 0x00000000FFFFFFFFull) | ((x & 0xFFFFFFFF00000000ull) >> (32 - 4 * BITS));
  }
  return x;
}

// The codes of a SIMD chunk x (values over their step, shifted by their offset) in its int32
// lanes: round_to_code lane by lane, minus lo. Clamping by max then min: max_ps returns its
// second operand, lo, for a NaN, as round_to_code does.
#if defined(__AVX512F__)
QEMBED_INLINE __m512i chunk_code_lanes(__m512 x, const float* u, bool stochastic, int32_t lo,
                                       int32_t hi) {
  __m512 r = stochastic ? Lanes<__m512>::floor(x + Lanes<__m512>::load(u))
                        : Lanes<__m512>::nearbyint(x);
  r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(static_cast<float>(lo))),
                    _mm512_set1_ps(static_cast<float>(hi)));
  return _mm512_sub_epi32(_mm512_cvttps_epi32(r), _mm512_set1_epi32(lo));
}
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
QEMBED_INLINE __m256i chunk_code_lanes(__m256 x, const float* u, bool stochastic, int32_t lo,
                                       int32_t hi) {
  __m256 r = stochastic ? Lanes<__m256>::floor(x + Lanes<__m256>::load(u))
                        : Lanes<__m256>::nearbyint(x);
  r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(static_cast<float>(lo))),
                    _mm256_set1_ps(static_cast<float>(hi)));
  return _mm256_sub_epi32(_mm256_cvttps_epi32(r), _mm256_set1_epi32(lo));
}
#endif

// The codes of the chunk x as bytes.
template <typename T>
QEMBED_INLINE void chunk_codes(T x, const float* u, bool stochastic, int32_t lo, int32_t hi,
                               uint8_t* out) {
  if constexpr (sizeof(T) == sizeof(float)) {
    *out = static_cast<uint8_t>(round_to_code(x, stochastic ? *u : 0.0f, stochastic, lo, hi) - lo);
#if defined(__AVX512F__)
  } else if constexpr (sizeof(T) == 64) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm512_cvtepi32_epi8(chunk_code_lanes(x, u, stochastic, lo, hi)));
#endif
  } else {
#if defined(__AVX2__) || defined(__AVX512F__)
    const __m256i c = chunk_code_lanes(x, u, stochastic, lo, hi);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(words, words));
#endif
  }
}

#if defined(__AVX2__) || defined(__AVX512F__)
// The 4-bit codes of a SIMD chunk packed in registers, byte j = code[2j] + 16 * code[2j + 1],
// stored at out: no byte buffer, whose 8-byte stores a wider load cannot take forwarded and
// must wait out. In each 64-bit lane c | c >> 28 puts the lane's pair in its low byte.
QEMBED_INLINE void chunk_nibbles(__m256 x, const float* u, bool stochastic, int32_t lo,
                                 int32_t hi, uint8_t* out) {
  const __m256i c = chunk_code_lanes(x, u, stochastic, lo, hi);
  const __m256i pairs = _mm256_or_si256(c, _mm256_srli_epi64(c, 28));
  const __m256i low_bytes = _mm256_shuffle_epi8(
      pairs, _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                              0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
  const __m128i packed = _mm_unpacklo_epi16(_mm256_castsi256_si128(low_bytes),
                                            _mm256_extracti128_si256(low_bytes, 1));
  const int32_t four = _mm_cvtsi128_si32(packed);
  std::memcpy(out, &four, 4);
}
#endif
#if defined(__AVX512F__)
QEMBED_INLINE void chunk_nibbles(__m512 x, const float* u, bool stochastic, int32_t lo,
                                 int32_t hi, uint8_t* out) {
  const __m512i c = chunk_code_lanes(x, u, stochastic, lo, hi);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out),
                   _mm512_cvtepi64_epi8(_mm512_or_si512(c, _mm512_srli_epi64(c, 28))));
}
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
// Their inverse, for the update's whole rows: the 8 (16) 4-bit codes at `codes` as floats.
// Byte j widened into 64-bit lane j and or-ed with itself shifted by 28 bits puts its high
// nibble at the foot of the odd 32-bit lane (the lookup's byte permute, which handles any
// width and window, cost the update 3-6%).
QEMBED_INLINE __m256 nibble_values(const uint8_t* codes, __m256) {
  int32_t four;
  std::memcpy(&four, codes, 4);
  const __m256i q = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
  return _mm256_cvtepi32_ps(
      _mm256_and_si256(_mm256_or_si256(q, _mm256_slli_epi64(q, 28)), _mm256_set1_epi32(15)));
}
#endif
#if defined(__AVX512F__)
QEMBED_INLINE __m512 nibble_values(const uint8_t* codes, __m512) {
  const __m512i q =
      _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  return _mm512_cvtepi32_ps(
      _mm512_and_si512(_mm512_or_si512(q, _mm512_slli_epi64(q, 28)), _mm512_set1_epi32(15)));
}
#endif

// codes of `dim` values: x = (w - bias) / scale, rounded into [offset, offset + 2^b - 1],
// stochastically with the uniforms of row k.row_key from element k.column_offset. In blocks
// of 64 values: their uniforms (sr_uniforms.h), their codes as bytes, then packed (4-bit
// codes in SIMD builds packed chunk by chunk in registers).
template <int BITS>
inline void encode_row(const float* w, int64_t dim, const RowParams& p, const RoundingKey& k,
                       uint8_t* codes) {
  constexpr int64_t kBlock = 64;
#if defined(__AVX2__) || defined(__AVX512F__)
  constexpr bool kNibblesInRegisters = BITS == 4;
#else
  constexpr bool kNibblesInRegisters = false;
#endif
  const int32_t lo = p.offset, hi = p.offset + static_cast<int32_t>(code_mask(BITS));
  alignas(64) float u[kBlock];
  alignas(8) uint8_t bytes[kBlock];
  for (int64_t b = 0; b < dim; b += kBlock) {
    const int64_t n = std::min(kBlock, dim - b);
    if (k.stochastic) sr_uniforms(k.seed, k.counter, k.row_key, k.column_offset + b, n, u);
    for_chunks(n, [&](auto lanes, int64_t d) {
      using T = decltype(lanes);
      const T x = (load_lanes<T>(w + b + d) - p.bias) / p.scale;
      if constexpr (kNibblesInRegisters)
        chunk_nibbles(x, u + d, k.stochastic, lo, hi, codes + (b + d) / 2);
      else
        chunk_codes(x, u + d, k.stochastic, lo, hi, bytes + d);
    });
    if constexpr (!kNibblesInRegisters) {
      for (int64_t g = 0; g < n / 8; ++g) {
        uint64_t x;
        std::memcpy(&x, bytes + 8 * g, 8);
        x = pack_code_bytes<BITS>(x);
        store_group<BITS>(codes + (b / 8 + g) * BITS, x);
      }
    }
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

// The lookup's accumulator over a block of up to kLanes columns: acc[d] += a * u_d on the
// raw codes u, one fused multiply-add per value. A row's constant part a * offset + c is
// the same for every column, so the caller sums it once per bag instead. kLanes columns'
// sums fill half the vector registers: 8 of 32 zmm with AVX-512, 8 of 16 ymm with AVX2.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define QEMBED_ACCUMULATOR_AVX512 1
constexpr int64_t kLanes = 128;
#elif defined(__AVX2__) && defined(__FMA__)
#define QEMBED_ACCUMULATOR_AVX2 1
constexpr int64_t kLanes = 64;  // 16 sums for 128 columns ran no faster than two passes of 8
#else
constexpr int64_t kLanes = 128;
#endif

#if defined(QEMBED_ACCUMULATOR_AVX512)
// 16 codes (2*bits bytes) per vector. A byte permute gives 32-bit lane i the two bytes
// holding code i, a variable shift aligns it, a mask cuts it out. One table per width.
struct DecodeTables {
  alignas(64) uint8_t byte_index[9][64];
  alignas(64) uint32_t shift[9][16];
  constexpr DecodeTables() : byte_index{}, shift{} {
    for (int b = 1; b <= 8; ++b)
      for (int i = 0; i < 16; ++i) {
        const int first = (i * b) / 8;
        byte_index[b][4 * i] = static_cast<uint8_t>(first);
        byte_index[b][4 * i + 1] = static_cast<uint8_t>(first + 1);  // past the codes: masked off
        byte_index[b][4 * i + 2] = byte_index[b][4 * i + 3] = 15;  // masked off below
        shift[b][i] = static_cast<uint32_t>((i * b) % 8);
      }
  }
};
inline constexpr DecodeTables kDecodeTables{};

// The 16 codes that start at byte `shift` of raw, as integers.
QEMBED_INLINE __m512i decode_bytes(__m128i raw, int bits, int shift) {
  const __m512i index = _mm512_add_epi8(_mm512_load_si512(kDecodeTables.byte_index[bits]),
                                        _mm512_set1_epi8(static_cast<char>(shift)));
  const __m512i bytes = _mm512_permutexvar_epi8(index, _mm512_zextsi128_si512(raw));
  return _mm512_and_si512(_mm512_srlv_epi32(bytes, _mm512_load_si512(kDecodeTables.shift[bits])),
                          _mm512_set1_epi32((1 << bits) - 1));
}

// Vector k (codes 16k .. 16k + 15) of a block of codes, as floats; a final half vector (8
// codes) leaves lanes 8-15 undefined. No load reaches into a cache line that holds none of
// the vector's bytes: such a load waits for that line from memory even where a mask
// discards its bytes (Zen 4, 2M rows of 4-bit codes: masked 16-byte loads of 8 bytes made
// the lookup 3-4x slower). Where the 16-byte window would cross into the next line it is
// moved back to end at the vector's last byte, and the byte permute shifted to match. For
// rows of any width (mixed-width tables, rows in random order), so without a branch on it.
QEMBED_INLINE __m512 decode16_any(const uint8_t* block, int bits, int k, bool half) {
  const uint8_t* first = block + 2 * bits * k;
  const int need = half ? bits : 2 * bits;
  const int shift = (reinterpret_cast<uintptr_t>(first) & 63) > 48 ? 16 - need : 0;
  const __mmask16 m = static_cast<__mmask16>(((1u << need) - 1u) << shift);
  const __m128i raw = _mm_maskz_loadu_epi8(m, first - shift);
  return _mm512_cvtepi32_ps(decode_bytes(raw, bits, shift));
}

// The same for a width known at compile time, where the block's codes (`total` bytes) are
// read through a 16-byte window inside the block (8 bytes for blocks of 8 to 15 at up to 4
// bits), moved back near its end: no address arithmetic per row. 8-bit codes need only a
// widening. Branches fold or, the block's size being fixed for a whole lookup, predict.
template <int BITS>
QEMBED_INLINE __m512 decode16(const uint8_t* block, int k, int total, bool half) {
  const int first = 2 * BITS * k;
  if (total < 16 && !(total >= 8 && BITS <= 4)) return decode16_any(block, BITS, k, half);
  const int size = total >= 16 ? 16 : 8;
  const int at = std::min(first, total - size);
  const __m128i raw = size == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + at))
                                 : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + at));
  if constexpr (BITS == 8)  // the window moves back by a half vector at most
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(first != at ? _mm_srli_si128(raw, 8) : raw));
  return _mm512_cvtepi32_ps(decode_bytes(raw, BITS, first - at));
}

// The width of the codes is a parameter of add(), not of the class, so rows of different
// widths (mixed-precision tables) can share one accumulator.
class Accumulator {
 public:
  // width: a multiple of 8 up to kLanes.
  explicit Accumulator(int64_t width)
      : vectors_(static_cast<int>((width + 15) / 16)), half_tail_(width % 16 != 0),
        width_(static_cast<int>(width)) {
    for (int k = 0; k < 8; ++k) sum_[k] = _mm512_setzero_ps();
  }
  // codes: the block's first code.
  template <int BITS>
  QEMBED_INLINE void add(const uint8_t* codes, float a) {
    const __m512 av = _mm512_set1_ps(a);
    const int total = width_ * BITS / 8;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      if (k >= vectors_) break;
      const bool half = half_tail_ && k == vectors_ - 1;
      sum_[k] = _mm512_fmadd_ps(av, decode16<BITS>(codes, k, total, half), sum_[k]);
    }
  }
  QEMBED_INLINE void add_any(const uint8_t* codes, int bits, float a) {
    const __m512 av = _mm512_set1_ps(a);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      if (k >= vectors_) break;
      const bool half = half_tail_ && k == vectors_ - 1;
      sum_[k] = _mm512_fmadd_ps(av, decode16_any(codes, bits, k, half), sum_[k]);
    }
  }
  QEMBED_INLINE void store(float* out) const {
    for (int k = 0; k < vectors_; ++k) {
      const __mmask16 m = (half_tail_ && k == vectors_ - 1) ? 0x00FF : 0xFFFF;
      _mm512_mask_storeu_ps(out + 16 * k, m, sum_[k]);
    }
  }

 private:
  __m512 sum_[8];
  int vectors_;
  bool half_tail_;
  int width_;
};

// A block of exactly 16 * VECS columns: no tail, loop fully unrolled.
template <int VECS>
class FixedAccumulator {
 public:
  FixedAccumulator() {
    for (int k = 0; k < VECS; ++k) sum_[k] = _mm512_setzero_ps();
  }
  template <int BITS>
  QEMBED_INLINE void add(const uint8_t* codes, float a) {
    const __m512 av = _mm512_set1_ps(a);
#pragma GCC unroll 8
    for (int k = 0; k < VECS; ++k)
      sum_[k] = _mm512_fmadd_ps(av, decode16<BITS>(codes, k, 2 * BITS * VECS, false), sum_[k]);
  }
  QEMBED_INLINE void add_any(const uint8_t* codes, int bits, float a) {
    const __m512 av = _mm512_set1_ps(a);
#pragma GCC unroll 8
    for (int k = 0; k < VECS; ++k)
      sum_[k] = _mm512_fmadd_ps(av, decode16_any(codes, bits, k, false), sum_[k]);
  }
  QEMBED_INLINE void store(float* out) const {
    for (int k = 0; k < VECS; ++k) _mm512_storeu_ps(out + 16 * k, sum_[k]);
  }

 private:
  __m512 sum_[VECS];
};
#elif defined(QEMBED_ACCUMULATOR_AVX2)
// 8 codes (exactly `bits` bytes, read as one group) per vector. A byte shuffle gives 32-bit
// lane i the two bytes holding code i, a variable shift aligns it, a mask cuts it out; 8-bit
// codes need only a widening. Widths come as template parameters: without AVX-512's masked
// byte loads a group cannot be read at a run-time width without reading past it, so mixed
// rows dispatch on their width.
struct DecodeTables8 {
  alignas(32) uint8_t byte_index[9][32];
  alignas(32) uint32_t shift[9][8];
  constexpr DecodeTables8() : byte_index{}, shift{} {
    for (int b = 1; b <= 8; ++b)
      for (int i = 0; i < 8; ++i) {
        const int first = (i * b) / 8;  // the same in both 128-bit halves (shuffles stay in one)
        byte_index[b][4 * i] = static_cast<uint8_t>(first);
        byte_index[b][4 * i + 1] = static_cast<uint8_t>(first + 1);
        byte_index[b][4 * i + 2] = byte_index[b][4 * i + 3] = 0x80;  // zero
        shift[b][i] = static_cast<uint32_t>((i * b) % 8);
      }
  }
};
inline constexpr DecodeTables8 kDecodeTables8{};

template <int BITS>
QEMBED_INLINE __m256 decode8(const uint8_t* codes) {
  if constexpr (BITS == 8) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(raw));
  } else {
    const __m256i group = _mm256_set1_epi64x(static_cast<int64_t>(load_group<BITS>(codes)));
    const __m256i bytes = _mm256_shuffle_epi8(
        group, _mm256_load_si256(reinterpret_cast<const __m256i*>(kDecodeTables8.byte_index[BITS])));
    const __m256i lanes = _mm256_and_si256(
        _mm256_srlv_epi32(bytes, _mm256_load_si256(
                                     reinterpret_cast<const __m256i*>(kDecodeTables8.shift[BITS]))),
        _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_cvtepi32_ps(lanes);
  }
}

// A block of exactly 8 * VECS columns, VECS <= 8: loop fully unrolled, sums in registers.
template <int VECS>
class VectorSums {
 public:
  VectorSums() {
    for (int k = 0; k < VECS; ++k) sum_[k] = _mm256_setzero_ps();
  }
  template <int BITS>
  QEMBED_INLINE void add(const uint8_t* codes, float a) {
    const __m256 av = _mm256_set1_ps(a);
#pragma GCC unroll 8
    for (int k = 0; k < VECS; ++k)
      sum_[k] = _mm256_fmadd_ps(av, decode8<BITS>(codes + k * BITS), sum_[k]);
  }
  QEMBED_INLINE void add_any(const uint8_t* codes, int bits, float a) {
    add_at_width(*this, codes, bits, a);
  }
  QEMBED_INLINE void store(float* out) const {
    for (int k = 0; k < VECS; ++k) _mm256_storeu_ps(out + 8 * k, sum_[k]);
  }

 private:
  __m256 sum_[VECS];
};

// 16 * VECS columns, as the AVX-512 accumulator counts them.
template <int VECS>
struct FixedAccumulator : VectorSums<2 * VECS> {};

// Any multiple of 8 up to kLanes columns (blocks of other widths than the fixed ones).
class Accumulator {
 public:
  explicit Accumulator(int64_t width) : vectors_(static_cast<int>(width / 8)) {
    for (int k = 0; k < kVectors; ++k) sum_[k] = _mm256_setzero_ps();
  }
  template <int BITS>
  QEMBED_INLINE void add(const uint8_t* codes, float a) {
    const __m256 av = _mm256_set1_ps(a);
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) {
      if (k >= vectors_) break;
      sum_[k] = _mm256_fmadd_ps(av, decode8<BITS>(codes + k * BITS), sum_[k]);
    }
  }
  QEMBED_INLINE void add_any(const uint8_t* codes, int bits, float a) {
    add_at_width(*this, codes, bits, a);
  }
  QEMBED_INLINE void store(float* out) const {
    for (int k = 0; k < vectors_; ++k) _mm256_storeu_ps(out + 8 * k, sum_[k]);
  }

 private:
  static constexpr int kVectors = kLanes / 8;
  __m256 sum_[kVectors];
  int vectors_;
};
#else
class Accumulator {
 public:
  explicit Accumulator(int64_t width) : width_(width) {
    for (int64_t d = 0; d < width_; ++d) sum_[d] = 0.0f;
  }
  template <int BITS>
  QEMBED_INLINE void add(const uint8_t* codes, float a) {
    for (int64_t g = 0; g < width_ / 8; ++g) {
      const uint64_t x = load_group<BITS>(codes + g * BITS);
      for (int i = 0; i < 8; ++i)
        sum_[g * 8 + i] = fmaf(a, static_cast<float>(group_code<BITS>(x, i)), sum_[g * 8 + i]);
    }
  }
  QEMBED_INLINE void add_any(const uint8_t* codes, int bits, float a) {
    add_at_width(*this, codes, bits, a);
  }
  QEMBED_INLINE void store(float* out) const {
    for (int64_t d = 0; d < width_; ++d) out[d] = sum_[d];
  }

 private:
  float sum_[kLanes];
  int64_t width_;
};

template <int VECS>
struct FixedAccumulator : Accumulator {
  FixedAccumulator() : Accumulator(16 * VECS) {}
};
#endif

// Calls f(accumulator) with the fastest accumulator for a block of `width` columns: the
// usual widths get a fully unrolled one.
template <typename F>
inline void with_accumulator(int64_t width, F&& f) {
  if constexpr (kLanes >= 128) {
    if (width == 128) return f(FixedAccumulator<8>());
  }
  switch (width) {
    case 64: f(FixedAccumulator<4>()); break;
    case 32: f(FixedAccumulator<2>()); break;
    case 16: f(FixedAccumulator<1>()); break;
    default: f(Accumulator(width));
  }
}

QEMBED_ISA_END
}  // namespace qembed
