// The fused low-precision update of one row, for every CPU kernel that trains rows in place
// (isa/lowp_update.cpp, isa/embedding_bags_update.cpp):
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

// Whether every x[0..n) is finite: x - x is 0 for finite x, NaN otherwise.
QEMBED_INLINE bool all_finite(const float* x, int64_t n) {
  LaneSum zeros;
  for_chunks(n, [&](auto lanes, int64_t d) {
    using T = decltype(lanes);
    const T v = load_lanes<T>(x + d);
    zeros.add(v - v, d);
  });
  return zeros.total() == 0.0f;
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
    LaneSum squares;
    for_chunks(width, [&](auto lanes, int64_t d) {
      using T = decltype(lanes);
      const T gd = decayed_grad(load_lanes<T>(w + d), load_lanes<T>(g + d), c);
      squares.add(gd * gd, d);
    });
    st[0] = st[0] + squares.total() / static_cast<float>(dim);
    const float denom = adagrad_denom(st[0], c);
    for_chunks(width, [&](auto lanes, int64_t d) {
      using T = decltype(lanes);
      store_lanes(w + d, adagrad_value(load_lanes<T>(w + d), load_lanes<T>(g + d), denom, c));
    });
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

// The update of one row of a table of BITS-bit codes. Returns false, having changed
// nothing, when the gradient or the given weights are not finite. With one step per table
// and learn_step the step cannot move before all rows are summed: the row's LSQ sum goes to
// *lsq and the row is left to encode_row once the step has moved (w keeps its values);
// otherwise the row is re-quantized here.
template <int BITS>
inline bool update_row(const RowUpdate& a, const UpdateConfig& c, const RoundingKey& key,
                       float* lsq) {
  const int64_t dim = c.dim, width = padded_dim(dim), po = param_offset(dim, BITS);
  const int32_t qn = qmin(BITS), qp = qmax(BITS);
  if (!all_finite(a.grad, width) || (a.weights && !all_finite(a.weights, width))) return false;
  const bool per_row = c.fmt == SYM_ROW;
  float s = per_row ? read_f32(a.row + po) : a.step;
  if (a.weights) {
    for (int64_t d = 0; d < width; ++d) a.w[d] = a.weights[d];
  } else {
    dequantize_row<BITS>(a.row, width, s, qn, a.w);
  }
  for (int64_t d = dim; d < width; ++d) a.w[d] = 0.0f;  // the pad encodes as zero, whatever it held
  optimizer_row(a.w, a.grad, a.state, c, a.moments);
  if (c.learn_step) {
    const float gs = lsq_sum(a.w, a.grad, width, s, qn, qp);
    if (!per_row) {
      *lsq = gs;
      return true;
    }
    s = next_step(s, lsq_scale(qp, dim) * gs, a.step_state, c);
    write_f32(a.row + po, s);
  }
  encode_row<BITS>(a.w, width, RowParams{s, 0.0f, qn}, key, a.row);
  return true;
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

// update_row for row unique_rows[k] of a's table with gradient grad ([padded dim]), its
// rounding keyed by the row (plus the table's row offset): its values go to a.kept (or
// scratch, 3 * padded dim floats), its LSQ sum, with one learnt step per table, to a.lsq. A
// row whose gradient or given weights are not finite is marked skipped (and reads NaN in the
// weights kept for the caller).
template <int BITS>
inline void update_unique_row(const UpdateArgs& a, int64_t k, const float* grad,
                              float* scratch) {
  const UpdateConfig& c = a.config;
  const int64_t width = padded_dim(c.dim), r = a.unique_rows[k];
  const int64_t ssw = c.step_optimizer == STEP_ADAM ? 2 : 0;
  float* w = a.kept ? a.kept + k * width : scratch;
  RoundingKey key = a.rounding;
  key.row_key = key.row_offset + static_cast<uint64_t>(r);
  const RowUpdate row{a.table.rows + r * a.table.stride,
                      c.fmt == SYM_ROW ? 0.0f : *a.table.table_step,
                      a.table.state + r * state_width(c.optimizer, c.dim),
                      a.table.step_state + r * ssw,
                      grad,
                      a.weights ? a.weights + k * width : nullptr,
                      w,
                      scratch + width};
  if (!update_row<BITS>(row, c, key, a.lsq ? a.lsq + k : nullptr)) {
    a.skipped[k] = 1;
    if (a.kept_for_caller)
      for (int64_t d = 0; d < width; ++d) w[d] = std::numeric_limits<float>::quiet_NaN();
  }
}

QEMBED_ISA_END
}  // namespace qembed
