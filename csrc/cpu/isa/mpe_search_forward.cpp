// mpe_search_forward's kernel, for one instruction set (compiled once per variant,
// dispatch.h). The arithmetic order matches qembed/reference.py (mpe_search_forward).
#include "mpe_search.h"
#include "../../layout.h"
#include "../../lsq_plus.h"

namespace qembed {
QEMBED_ISA_BEGIN
namespace {

// out[d] = sum over candidates b > 0 (in order) of p_b * Q_b(w)_d.
void expected_row(const float* w, const SearchQuantizer& q, const float* p, float* out) {
  for (int64_t d = 0; d < q.dim; ++d) out[d] = 0.0f;
  for (int64_t k = 0; k < q.num_candidates; ++k) {
    const int64_t b = q.bits[k];
    if (b == 0) continue;
    const int32_t lo = qmin(b), hi = qmax(b);
    for (int64_t d = 0; d < q.dim; ++d)
      out[d] = out[d] + p[k] * lsq_plus_value(w[d], q.beta[d], q.alpha[k], lo, hi);
  }
}

}  // namespace

void mpe_search_forward_rows(const SearchForwardArgs& a, int64_t begin, int64_t end,
                             float* value) {
  const SearchQuantizer& q = a.q;
  const int64_t dim = q.dim;
  auto expected = [&](int64_t r, float* out) {
    expected_row(a.weight + r * dim, q, q.probs + q.row_group[r] * q.num_candidates, out);
  };
  if (!a.starts) {
    for (int64_t p = begin; p < end; ++p) expected(a.indices[p], a.out + p * dim);
    return;
  }
  for (int64_t b = begin; b < end; ++b) {
    float* acc = a.out + b * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] = 0.0f;
    for (int64_t p = a.starts[b]; p < a.starts[b + 1]; ++p) {
      expected(a.indices[p], value);
      for (int64_t d = 0; d < dim; ++d) acc[d] += value[d];
    }
    const int64_t len = a.starts[b + 1] - a.starts[b];
    if (a.mean && len > 0)
      for (int64_t d = 0; d < dim; ++d) acc[d] /= static_cast<float>(len);
  }
}

QEMBED_ISA_END
}  // namespace qembed
