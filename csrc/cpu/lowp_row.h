// One row of the fused low-precision training step, shared by lowp_update (one table) and
// embedding_bags_update (all tables of a batch): each row's codes, step and optimizer state
// are read once and written once (see lowp_update.cpp for the whole step).
#pragma once
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include "../optim.h"
#include "row_codec.h"

namespace qembed {

// Always inlined, as RowPrefetch (bags.h): out of line, GCC drops its calls.
QEMBED_INLINE void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 1, 1);
  __builtin_prefetch(c + bytes - 1, 1, 1);
}

inline bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

// Sum of x[0..n) strictly left to right (the reference's order).
inline float ordered_sum(const float* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i];
  return acc;
}

// w <- w - lr * U(g + wd * w); st is the row's optimizer state, tmp has dim floats.
// Element-wise work sits in loops of its own so that they vectorize; only the ordered
// sums stay serial.
inline void optimizer_row(float* w, const float* g, float* st, float* tmp, const UpdateConfig& c) {
  const int64_t dim = c.dim;
  if (c.optimizer == OPT_SGD) {
    for (int64_t d = 0; d < dim; ++d) w[d] = sgd_value(w[d], g[d], c);
  } else if (c.optimizer == OPT_ADAGRAD) {
    for (int64_t d = 0; d < dim; ++d) {
      const float gd = decayed_grad(w[d], g[d], c);
      tmp[d] = gd * gd;
    }
    st[0] = st[0] + ordered_sum(tmp, dim) / static_cast<float>(dim);
    const float denom = adagrad_denom(st[0], c);
    for (int64_t d = 0; d < dim; ++d) w[d] = adagrad_value(w[d], g[d], denom, c);
  } else if (c.optimizer == OPT_ADAM) {
    float* m = st;
    float* v = st + dim;
    for (int64_t d = 0; d < dim; ++d) w[d] = adam_value(w[d], g[d], m[d], v[d], c);
  }
}

// LSQ: sum_d g_d * dQ/ds (optim.h's lsq_term), in row order.
inline float lsq_sum(const float* w, const float* g, int64_t dim, float s, int32_t qn, int32_t qp,
              float* tmp) {
  for (int64_t d = 0; d < dim; ++d) tmp[d] = lsq_term(w[d], g[d], s, qn, qp);
  return ordered_sum(tmp, dim);
}

// Re-quantizes the fp32 values w into row r with step s, rounding keyed by that row.
template <int BITS>
inline void requantize_row(uint8_t* table, int64_t stride, int64_t r, const float* w,
                           int64_t dim, float s, RoundingKey key) {
  key.row_key = key.row_offset + static_cast<uint64_t>(r);
  encode_row<BITS>(w, dim, RowParams{s, 0.0f, qmin(BITS)}, key, table + r * stride);
}

// Where a row's update reads and writes: one table's buffers.
struct UpdateTable {
  uint8_t* rows;
  int64_t stride;
  float* table_step;  // SYM_TABLE: the table's step
  float* state;       // [R, state_width]
  float* step_state;  // [R or 1, 2] with a learned step under Adam
};

// One row's whole update, as lowp_update and embedding_bags_update both run it: row r starts
// from its dequantized values (or `given`), is stepped by the optimizer into w [dim], moves
// its step by LSQ if learned and is re-quantized. Returns false, touching nothing, for a
// non-finite gradient or given value. With `deferred` (a learned per-table step, which
// moves only once every row's LSQ sum is known) it stops before the step: w and *lsq are
// left for the caller. tmp: dim floats of scratch.
template <int BITS>
inline bool update_row(const UpdateTable& t, int64_t r, const float* g, const float* given,
                       float* w, float* tmp, bool deferred, float* lsq, const UpdateConfig& c,
                       const RoundingKey& rounding) {
  const int64_t dim = c.dim, po = param_offset(dim, BITS);
  if (!all_finite(g, dim) || (given && !all_finite(given, dim))) return false;
  const int32_t qn = qmin(BITS), qp = qmax(BITS);
  uint8_t* row = t.rows + r * t.stride;
  float s = c.fmt == SYM_ROW ? read_f32(row + po) : *t.table_step;
  if (given) {
    std::copy(given, given + dim, w);
  } else {
    std::fill(w, w + dim, 0.0f);
    accumulate_row<BITS>(row, dim, s, 0.0f, qn, w);
  }
  optimizer_row(w, g, t.state + r * state_width(c.optimizer, dim), tmp, c);
  if (c.learn_step) {
    const float gs = lsq_sum(w, g, dim, s, qn, qp, tmp);
    if (deferred) {
      *lsq = gs;
      return true;
    }
    const int64_t ssw = c.step_optimizer == STEP_ADAM ? 2 : 0;
    s = next_step(s, lsq_scale(qp, dim) * gs, t.step_state + r * ssw, c);
    write_f32(row + po, s);
  }
  requantize_row<BITS>(t.rows, t.stride, r, w, dim, s, rounding);
  return true;
}


// The deferred end of an update of a table with one learned step: the LSQ sums of the rows
// not skipped, added in row order, move the step, then every such row (values kept in w,
// [U, dim]) is re-quantized at the new step.
template <int BITS>
void finish_table_step(const UpdateTable& t, const int64_t* uniq, int64_t num_unique,
                       const float* w, const float* lsq, const uint8_t* skipped,
                       int64_t num_skipped, const UpdateConfig& c, const RoundingKey& rounding) {
  float gs = 0.0f;
  for (int64_t k = 0; k < num_unique; ++k)
    if (!skipped[k]) gs += lsq[k];
  const float s = next_step(*t.table_step,
                            lsq_scale(qmax(BITS), (num_unique - num_skipped) * c.dim) * gs,
                            t.step_state, c);
  *t.table_step = s;
  at::parallel_for(0, num_unique, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      if (!skipped[k]) requantize_row<BITS>(t.rows, t.stride, uniq[k], w + k * c.dim, c.dim, s, rounding);
  });
}

}  // namespace qembed
