// lowp_update's kernels: the fused low-precision training step of cpu/lowp_update.cpp, for
// one instruction set (compiled once per variant, dispatch.h). Each row's codes, step and
// optimizer state are read once and written once.
#include "lowp_update.h"
#include <cmath>
#include <limits>
#include "../../layout.h"
#include "../row_codec.h"

namespace qembed {
QEMBED_ISA_BEGIN
namespace {

constexpr int64_t kPrefetchDistance = 8;

// Always inlined, as RowPrefetch (prefetch.h): out of line, GCC drops its calls.
QEMBED_INLINE void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 1, 1);
  __builtin_prefetch(c + bytes - 1, 1, 1);
}

bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

// Sum of x[0..n) strictly left to right (the reference's order).
float ordered_sum(const float* x, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i];
  return acc;
}

// w <- w - lr * U(g + wd * w); st is the row's optimizer state, tmp has dim floats.
// Element-wise work sits in loops of its own so that they vectorize; only the ordered
// sums stay serial.
void optimizer_row(float* w, const float* g, float* st, float* tmp, const UpdateConfig& c) {
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
float lsq_sum(const float* w, const float* g, int64_t dim, float s, int32_t qn, int32_t qp,
              float* tmp) {
  for (int64_t d = 0; d < dim; ++d) tmp[d] = lsq_term(w[d], g[d], s, qn, qp);
  return ordered_sum(tmp, dim);
}

template <int BITS>
void encode(const UpdateArgs& a, const float* w, int64_t r, float s) {
  RoundingKey key = a.rounding;
  key.row_key = static_cast<uint64_t>(r);
  encode_row<BITS>(w, a.config.dim, RowParams{s, 0.0f, qmin(BITS)}, key, a.table + r * a.stride);
}

template <int BITS>
void update_rows(const UpdateArgs& a, int64_t begin, int64_t end, float* local, float* tmp) {
  const UpdateConfig& c = a.config;
  const int64_t dim = c.dim, stride = a.stride, po = param_offset(dim, BITS);
  const int64_t sw = state_width(c.optimizer, dim), ssw = c.step_optimizer == STEP_ADAM ? 2 : 0;
  const int32_t qn = qmin(BITS), qp = qmax(BITS);
  const bool per_row = c.fmt == SYM_ROW;
  const bool deferred = c.learn_step && !per_row;
  const float row_gscale = lsq_scale(qp, dim);
  for (int64_t k = begin; k < end; ++k) {
    // Rows of a large table miss the caches: fetch upcoming rows and their state early.
    if (k + kPrefetchDistance < end) {
      const int64_t next = a.unique_rows[k + kPrefetchDistance];
      prefetch_span(a.table + next * stride, stride);
      if (sw > 0) prefetch_span(a.state + next * sw, sw * sizeof(float));
    }
    const float* g = a.grad + k * dim;
    float* w = a.kept ? a.kept + k * dim : local;
    if (!all_finite(g, dim) || (a.weights && !all_finite(a.weights + k * dim, dim))) {
      a.skipped[k] = 1;
      if (a.kept_for_caller)
        for (int64_t d = 0; d < dim; ++d) w[d] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const int64_t r = a.unique_rows[k];
    uint8_t* row = a.table + r * stride;
    float s = per_row ? read_f32(row + po) : *a.table_step;
    if (a.weights) {
      for (int64_t d = 0; d < dim; ++d) w[d] = a.weights[k * dim + d];
    } else {
      for (int64_t d = 0; d < dim; ++d) w[d] = 0.0f;
      accumulate_row<BITS>(row, dim, s, 0.0f, qn, w);
    }
    optimizer_row(w, g, a.state + r * sw, tmp, c);
    if (c.learn_step) {
      const float gs = lsq_sum(w, g, dim, s, qn, qp, tmp);
      if (deferred) {
        a.lsq[k] = gs;
        continue;
      }
      s = next_step(s, row_gscale * gs, a.step_state + r * ssw, c);
      write_f32(row + po, s);
    }
    encode<BITS>(a, w, r, s);
  }
}

}  // namespace

void lowp_update_rows(const UpdateArgs& a, int64_t begin, int64_t end, float* scratch) {
  QEMBED_DISPATCH_BITS(a.bits, [&] {
    update_rows<BITS>(a, begin, end, scratch, scratch + a.config.dim);
  });
}

void lowp_update_encode(const UpdateArgs& a, int64_t begin, int64_t end, float step) {
  QEMBED_DISPATCH_BITS(a.bits, [&] {
    for (int64_t k = begin; k < end; ++k)
      if (!a.skipped[k]) encode<BITS>(a, a.kept + k * a.config.dim, a.unique_rows[k], step);
  });
}

QEMBED_ISA_END
}  // namespace qembed
