// SIMD lanes for the element-wise arithmetic of the CPU update: optim.h's templates run on
// GCC's vector types (__m512: 16 floats with AVX-512, __m256: 8 with AVX2), whose + - * /
// and comparisons act per lane with IEEE rounding, or on float without either. A row of
// `dim` values (a multiple of 8) is walked in chunks of the widest type that fits.
#pragma once
#include <cstdint>
#include "../optim.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// GCC warns that a template argument drops the vector types' may_alias attribute; the
// specialisations only name the types, they never alias through them.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"

namespace qembed {

#define QEMBED_LANES_INLINE inline __attribute__((always_inline))

#if defined(__AVX2__)
template <>
struct Lanes<__m256> {
  static QEMBED_LANES_INLINE __m256 splat(float x) { return _mm256_set1_ps(x); }
  static QEMBED_LANES_INLINE __m256 sqrt(__m256 x) { return _mm256_sqrt_ps(x); }
  static QEMBED_LANES_INLINE __m256 nearbyint(__m256 x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static QEMBED_LANES_INLINE __m256 floor(__m256 x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  static QEMBED_LANES_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static QEMBED_LANES_INLINE void store(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
};
#endif

#if defined(__AVX512F__)
template <>
struct Lanes<__m512> {
  static QEMBED_LANES_INLINE __m512 splat(float x) { return _mm512_set1_ps(x); }
  static QEMBED_LANES_INLINE __m512 sqrt(__m512 x) { return _mm512_sqrt_ps(x); }
  static QEMBED_LANES_INLINE __m512 nearbyint(__m512 x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static QEMBED_LANES_INLINE __m512 floor(__m512 x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  static QEMBED_LANES_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static QEMBED_LANES_INLINE void store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
};
#endif

template <typename T>
QEMBED_LANES_INLINE T load_lanes(const float* p) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return *p;
  } else {
    return Lanes<T>::load(p);
  }
}

template <typename T>
QEMBED_LANES_INLINE void store_lanes(float* p, T x) {
  if constexpr (sizeof(T) == sizeof(float)) {
    *p = x;
  } else {
    Lanes<T>::store(p, x);
  }
}

// f(T{}, d) for the chunks [d, d + lanes of T) that cover [0, dim), dim a multiple of 8.
template <typename F>
QEMBED_LANES_INLINE void for_chunks(int64_t dim, F&& f) {
#if defined(__AVX512F__)
  int64_t d = 0;
  for (; d + 16 <= dim; d += 16) f(__m512{}, d);
  if (d < dim) f(__m256{}, d);
#elif defined(__AVX2__)
  for (int64_t d = 0; d < dim; d += 8) f(__m256{}, d);
#else
  for (int64_t d = 0; d < dim; ++d) f(0.0f, d);
#endif
}

// The sum of a row in optim.h's order (kSumLanes): add(x, d) the chunk of elements from d,
// in increasing d, then total(). The partials start at +0 and so never hold -0: a chunk
// that covers only some of them adds +0 to the others, which changes nothing.
class LaneSum {
 public:
#if defined(__AVX512F__)
  QEMBED_LANES_INLINE void add(__m512 x, int64_t) { acc_ = acc_ + x; }
  // Only the 8 elements past the last 16 come alone: they start at a multiple of 16.
  QEMBED_LANES_INLINE void add(__m256 x, int64_t) { acc_ = acc_ + _mm512_zextps256_ps512(x); }
  QEMBED_LANES_INLINE float total() const {
    const __m256 lo = _mm512_castps512_ps256(acc_);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc_), 1));
    return halves(lo + hi);
  }

 private:
  __m512 acc_ = _mm512_setzero_ps();
#elif defined(__AVX2__)
  QEMBED_LANES_INLINE void add(__m256 x, int64_t d) {
    if (d & 8)
      hi_ = hi_ + x;
    else
      lo_ = lo_ + x;
  }
  QEMBED_LANES_INLINE float total() const { return halves(lo_ + hi_); }

 private:
  __m256 lo_ = _mm256_setzero_ps(), hi_ = _mm256_setzero_ps();
#else
  QEMBED_LANES_INLINE void add(float x, int64_t d) { acc_[d % kSumLanes] += x; }
  float total() const {
    float h[kSumLanes];
    for (int j = 0; j < kSumLanes; ++j) h[j] = acc_[j];
    for (int n = kSumLanes / 2; n >= 1; n /= 2)
      for (int j = 0; j < n; ++j) h[j] = h[j] + h[j + n];
    return h[0];
  }

 private:
  float acc_[kSumLanes] = {};
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
  // 8 partials -> 4 -> 2 -> 1, upper half onto lower.
  static QEMBED_LANES_INLINE float halves(__m256 h) {
    const __m128 q = _mm256_castps256_ps128(h) + _mm256_extractf128_ps(h, 1);
    const __m128 p = q + _mm_movehl_ps(q, q);
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
  }
#endif
};

}  // namespace qembed

#pragma GCC diagnostic pop
