// The fused low-precision update of a row, for every CPU kernel that trains rows in place
// (isa/lowp_update.cpp, isa/embedding_bags_update.cpp, isa/embedding_bags_backward_update.cpp),
// a few rows at a time (update_rows):
//   w = s * q (or the given fp32 weights)      dequantize
//   w -= lr * U(g + wd * w)                     SGD, row-wise Adagrad or Adam, in fp32
//   s -= step_lr * V(g_s)                       ALPT: LSQ step gradient (per-row step)
//   q = clamp(floor(w / s + u) or round(w / s)) stochastic (Philox keyed by row) or nearest
// in SIMD lanes (lanes.h), every value rounded as qembed/reference.py rounds it.
// A row of D values is worked on at its padded width (layout.h): the fp32 buffers (w, the
// gradient, given weights) hold padded_dim(D) columns, the pad ones zero. Zeros change no
// optimizer value and no row sum, so the lanes run over whole chunks while divisors count the
// D real columns; only Adam's state, [R, 2D], is copied to padded rows around the step.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include "../optim.h"
#include "isa/lowp_update.h"
#include "lanes.h"
#include "row_codec.h"

namespace qembed {
QEMBED_ISA_BEGIN

// The unsigned codes of the chunk of T from element d, as floats.
template <int BITS, typename T>
QEMBED_INLINE T chunk_code_values(const uint8_t* codes, int64_t d, int64_t dim) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return static_cast<float>(group_code<BITS>(load_group<BITS>(codes + d / 8 * BITS),
                                               static_cast<int>(d % 8)));
  } else if constexpr (BITS == 4) {
    return nibble_values(codes + d / 2, T{});
#if defined(QEMBED_ACCUMULATOR_AVX512)
  } else if constexpr (sizeof(T) == 64) {
    return decode16<BITS>(codes, static_cast<int>(d / 16), static_cast<int>(dim * BITS / 8),
                          false);
  } else {
    return _mm512_castps512_ps256(decode16<BITS>(codes, static_cast<int>(d / 16),
                                                 static_cast<int>(dim * BITS / 8), true));
#elif defined(QEMBED_ACCUMULATOR_AVX2)
#if defined(__AVX512F__)
  } else if constexpr (sizeof(T) == 64) {  // AVX-512 without the byte permutes
    const __m256 lo = decode8<BITS>(codes + d / 8 * BITS);
    const __m256 hi = decode8<BITS>(codes + (d / 8 + 1) * BITS);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                                               _mm256_castps_pd(hi), 1));
#endif
  } else {
    return decode8<BITS>(codes + d / 8 * BITS);
#endif
  }
}

// w[d] = s * (code_d + offset), as accumulate_row adds it to zeros.
template <int BITS>
QEMBED_INLINE void dequantize_row(const uint8_t* codes, int64_t dim, float s, int32_t offset,
                                  float* w) {
  const float off = static_cast<float>(offset);
  for_chunks(dim, [&](auto lanes, int64_t d) {
    using T = decltype(lanes);
    store_lanes(w + d, s * (chunk_code_values<BITS, T>(codes, d, dim) + off) + 0.0f);
  });
}

// Whether every x[0..n) is finite: x - x is +0 (no bit set) for finite x, NaN otherwise;
// the lanes' bits are or-ed and tested once, no sum across lanes.
QEMBED_INLINE bool all_finite(const float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512i bits = _mm512_setzero_si512();
  for_chunks(n, [&](auto lanes, int64_t d) {
    using T = decltype(lanes);
    const T v = load_lanes<T>(x + d);
    if constexpr (sizeof(T) == 64)
      bits = _mm512_or_si512(bits, _mm512_castps_si512(v - v));
    else
      bits = _mm512_or_si512(bits, _mm512_zextsi256_si512(_mm256_castps_si256(v - v)));
  });
  return _mm512_test_epi32_mask(bits, bits) == 0;
#elif defined(__AVX2__)
  __m256i bits = _mm256_setzero_si256();
  for_chunks(n, [&](auto, int64_t d) {
    const __m256 v = _mm256_loadu_ps(x + d);
    bits = _mm256_or_si256(bits, _mm256_castps_si256(v - v));
  });
  return _mm256_testz_si256(bits, bits);
#else
  for (int64_t d = 0; d < n; ++d)
    if (!(x[d] - x[d] == 0.0f)) return false;
  return true;
#endif
}

// Row-wise Adagrad's sum of the row's squared (decayed) gradient over its padded width.
QEMBED_INLINE float adagrad_squares(const float* w, const float* g, const UpdateConfig& c) {
  LaneSum squares;
  for_chunks(padded_dim(c.dim), [&](auto lanes, int64_t d) {
    using T = decltype(lanes);
    const T gd = decayed_grad(load_lanes<T>(w + d), load_lanes<T>(g + d), c);
    squares.add(gd * gd, d);
  });
  return squares.total();
}

// w <- Adagrad's step of w with the row's denominator.
QEMBED_INLINE void adagrad_row(float* w, const float* g, float denom, const UpdateConfig& c) {
  for_chunks(padded_dim(c.dim), [&](auto lanes, int64_t d) {
    using T = decltype(lanes);
    store_lanes(w + d, adagrad_value(load_lanes<T>(w + d), load_lanes<T>(g + d), denom, c));
  });
}

// w <- w - lr * U(g + wd * w) over the row's padded width; st is the row's optimizer state.
// Adam's moments of a row whose dim is not a multiple of 8 are copied to padded rows in
// `moments` (2 * padded dim floats) and back.
QEMBED_INLINE void optimizer_row(float* w, const float* g, float* st, const UpdateConfig& c,
                                 float* moments) {
  const int64_t dim = c.dim, width = padded_dim(dim);
  if (c.optimizer == OPT_SGD) {
    for_chunks(width, [&](auto lanes, int64_t d) {
      using T = decltype(lanes);
      store_lanes(w + d, sgd_value(load_lanes<T>(w + d), load_lanes<T>(g + d), c));
    });
  } else if (c.optimizer == OPT_ADAGRAD) {
    st[0] = st[0] + adagrad_squares(w, g, c) / static_cast<float>(dim);
    adagrad_row(w, g, adagrad_denom(st[0], c), c);
  } else if (c.optimizer == OPT_ADAM) {
    const bool padded = width != dim;
    float* m_row = padded ? moments : st;
    float* v_row = padded ? moments + width : st + dim;
    if (padded) {
      for (int64_t d = 0; d < width; ++d) {
        m_row[d] = d < dim ? st[d] : 0.0f;
        v_row[d] = d < dim ? st[dim + d] : 0.0f;
      }
    }
    for_chunks(width, [&](auto lanes, int64_t d) {
      using T = decltype(lanes);
      T m = load_lanes<T>(m_row + d), v = load_lanes<T>(v_row + d);
      store_lanes(w + d, adam_value(load_lanes<T>(w + d), load_lanes<T>(g + d), m, v, c));
      store_lanes(m_row + d, m);
      store_lanes(v_row + d, v);
    });
    if (padded) {
      for (int64_t d = 0; d < dim; ++d) {
        st[d] = m_row[d];
        st[dim + d] = v_row[d];
      }
    }
  }
}

// LSQ: sum_d g_d * dQ/ds (optim.h's lsq_term) at step s.
QEMBED_INLINE float lsq_sum(const float* w, const float* g, int64_t dim, float s, int32_t qn,
                            int32_t qp) {
  LaneSum sum;
  for_chunks(dim, [&](auto lanes, int64_t d) {
    using T = decltype(lanes);
    sum.add(lsq_term(load_lanes<T>(w + d), load_lanes<T>(g + d), s, qn, qp), d);
  });
  return sum.total();
}

// Where one row's update reads and writes.
struct RowUpdate {
  uint8_t* row;            // the packed row: codes, then its step with SYM_ROW
  float step;              // the table's step (SYM_TABLE)
  float* state;            // the row's optimizer state
  float* step_state;       // its step's Adam state (SYM_ROW, learn_step with Adam)
  const float* grad;       // its gradient [padded dim]
  const float* weights;    // optional: fp32 values to start from instead of the codes
  float* w;                // [padded dim]: the updated fp32 values
  float* moments;          // [2 * padded dim] of scratch (Adam, dim not a multiple of 8)
};

// How many rows to update together at a padded width: kRowsTogether up to 64 values, and up
// to 128 with AVX-512; two for wider rows, which keep the core busy on their own chunks. In
// the caches, at 128 values four rows at a time took 131-133 ns a row against 137-143 for
// two on Zen 4 (AVX-512), but 163-169 against 160-161 with AVX2 there, and on Zen 3 (AVX2)
// four were no faster than one, two up to 5% faster; at 256 values four were slower (Zen 4).
QEMBED_INLINE int rows_together(int64_t width) {
#if defined(__AVX512F__)
  return width <= 128 ? kRowsTogether : 2;
#else
  return width <= 64 ? kRowsTogether : 2;
#endif
}

// The updates of rows a[0, n) (n <= kRowsTogether) of a table of BITS-bit codes, each as
// one row alone would be updated, in phases over the rows. ok[i] is false, row i unchanged,
// when its gradient or given weights are not finite. With one step per table and
// learn_step the step cannot move before all rows are summed: each row's LSQ sum goes to
// *lsq[i] and the row is left to encode_row once the step has moved (w keeps its values);
// otherwise the rows are re-quantized here.
template <int BITS>
inline void update_rows(const RowUpdate* a, int n, const UpdateConfig& c,
                        const RoundingKey* keys, float* const* lsq, bool* ok) {
  const int64_t dim = c.dim, width = padded_dim(dim), po = param_offset(dim, BITS);
  const int32_t qn = qmin(BITS), qp = qmax(BITS);
  const bool per_row = c.fmt == SYM_ROW;
  float s[kRowsTogether];
  for (int i = 0; i < n; ++i) {
    ok[i] = all_finite(a[i].grad, width) && (!a[i].weights || all_finite(a[i].weights, width));
    if (!ok[i]) continue;
    s[i] = per_row ? read_f32(a[i].row + po) : a[i].step;
    if (a[i].weights) {
      for (int64_t d = 0; d < width; ++d) a[i].w[d] = a[i].weights[d];
    } else {
      dequantize_row<BITS>(a[i].row, width, s[i], qn, a[i].w);
    }
    for (int64_t d = dim; d < width; ++d) a[i].w[d] = 0.0f;  // the pad encodes as zero
  }
  if (c.optimizer == OPT_ADAGRAD) {
    float squares[kRowsTogether];
    for (int i = 0; i < n; ++i)
      if (ok[i]) squares[i] = adagrad_squares(a[i].w, a[i].grad, c);
    for (int i = 0; i < n; ++i) {
      if (!ok[i]) continue;
      a[i].state[0] = a[i].state[0] + squares[i] / static_cast<float>(dim);
      adagrad_row(a[i].w, a[i].grad, adagrad_denom(a[i].state[0], c), c);
    }
  } else {
    for (int i = 0; i < n; ++i)
      if (ok[i]) optimizer_row(a[i].w, a[i].grad, a[i].state, c, a[i].moments);
  }
  bool encode = true;
  if (c.learn_step) {
    float gs[kRowsTogether];
    for (int i = 0; i < n; ++i)
      if (ok[i]) gs[i] = lsq_sum(a[i].w, a[i].grad, width, s[i], qn, qp);
    for (int i = 0; i < n; ++i) {
      if (!ok[i]) continue;
      if (!per_row) {
        *lsq[i] = gs[i];
        continue;
      }
      s[i] = next_step(s[i], lsq_scale(qp, dim) * gs[i], a[i].step_state, c);
      write_f32(a[i].row + po, s[i]);
    }
    encode = per_row;
  }
  if (!encode) return;
  for (int i = 0; i < n; ++i)
    if (ok[i]) encode_row<BITS>(a[i].w, width, RowParams{s[i], 0.0f, qn}, keys[i], a[i].row);
}

// Rows of a large table miss the caches: the update fetches upcoming rows and their state
// this many rows early.
constexpr int64_t kUpdatePrefetchDistance = 8;

// Always inlined, as RowPrefetch (prefetch.h): out of line, GCC drops its calls.
QEMBED_INLINE void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 1, 1);
  __builtin_prefetch(c + bytes - 1, 1, 1);
}

// Prefetches row unique_rows[k] of a's table and its optimizer state.
QEMBED_INLINE void prefetch_unique_row(const UpdateArgs& a, int64_t k) {
  const int64_t r = a.unique_rows[k], sw = state_width(a.config.optimizer, a.config.dim);
  prefetch_span(a.table.rows + r * a.table.stride, a.table.stride);
  if (sw > 0) prefetch_span(a.table.state + r * sw, sw * sizeof(float));
}

// update_rows for rows unique_rows[k, k + n) of a's table (n <= kRowsTogether) with
// gradients grads[i] ([padded dim] each), their rounding keyed by the row (plus the table's
// row offset): their values go to a.kept (or scratch, 3 * padded dim floats a row), their LSQ
// sums, with one learnt step per table, to a.lsq. A row whose gradient or given weights are
// not finite is marked skipped (and reads NaN in the weights kept for the caller).
template <int BITS>
inline void update_unique_rows(const UpdateArgs& a, int64_t k, int n, const float* const* grads,
                               float* scratch) {
  const UpdateConfig& c = a.config;
  const int64_t width = padded_dim(c.dim);
  const int64_t ssw = c.step_optimizer == STEP_ADAM ? 2 : 0;
  RowUpdate rows[kRowsTogether];
  RoundingKey keys[kRowsTogether];
  float* lsq[kRowsTogether];
  bool ok[kRowsTogether];
  for (int i = 0; i < n; ++i) {
    const int64_t r = a.unique_rows[k + i];
    float* w = a.kept ? a.kept + (k + i) * width : scratch + 3 * width * i;
    keys[i] = a.rounding;
    keys[i].row_key = keys[i].row_offset + static_cast<uint64_t>(r);
    lsq[i] = a.lsq ? a.lsq + k + i : nullptr;
    rows[i] = RowUpdate{a.table.rows + r * a.table.stride,
                        c.fmt == SYM_ROW ? 0.0f : *a.table.table_step,
                        a.table.state + r * state_width(c.optimizer, c.dim),
                        a.table.step_state + r * ssw,
                        grads[i],
                        a.weights ? a.weights + (k + i) * width : nullptr,
                        w,
                        scratch + 3 * width * i + width};
  }
  update_rows<BITS>(rows, n, c, keys, lsq, ok);
  for (int i = 0; i < n; ++i) {
    if (ok[i]) continue;
    a.skipped[k + i] = 1;
    if (a.kept_for_caller)
      for (int64_t d = 0; d < width; ++d) rows[i].w[d] = std::numeric_limits<float>::quiet_NaN();
  }
}

// How many rows update_unique_rows takes next from row k of a's table, with items_left
// work items left in the caller's range; the rows kUpdatePrefetchDistance beyond each
// (within the range) are fetched.
QEMBED_INLINE int next_rows(const UpdateArgs& a, int64_t k, int64_t items_left) {
  const int n = static_cast<int>(std::min<int64_t>(
      {rows_together(padded_dim(a.config.dim)), items_left, a.num_unique - k}));
  for (int j = 0; j < n; ++j)
    if (k + j + kUpdatePrefetchDistance < a.num_unique && j + kUpdatePrefetchDistance < items_left)
      prefetch_unique_row(a, k + j + kUpdatePrefetchDistance);
  return n;
}

// update_unique_rows for rows [k, k + n) with their gradients in a.grad.
template <int BITS>
inline void update_stored_rows(const UpdateArgs& a, int64_t k, int n, float* scratch) {
  const int64_t width = padded_dim(a.config.dim);
  const float* grads[kRowsTogether];
  for (int j = 0; j < n; ++j) grads[j] = a.grad + (k + j) * width;
  update_unique_rows<BITS>(a, k, n, grads, scratch);
}

QEMBED_ISA_END
}  // namespace qembed
