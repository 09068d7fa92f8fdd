// mpe_search_backward's kernel, for one instruction set (compiled once per variant,
// dispatch.h).
#include <cmath>
#include "mpe_search.h"
#include "../../layout.h"
#include "../../lsq_plus.h"

namespace qembed {
QEMBED_ISA_BEGIN

void mpe_search_backward_rows(const SearchBackwardArgs& a, int64_t begin, int64_t end) {
  const SearchQuantizer& q = a.q;
  const int64_t dim = q.dim, m = q.num_candidates;
  for (int64_t i = begin; i < end; ++i) {
    const float* w = a.weight + a.unique_rows[i] * dim;
    const float* g = a.grad + i * dim;
    const float* p = q.probs + q.row_group[a.unique_rows[i]] * m;
    float* gw = a.grad_weight + i * dim;
    float* gb = a.part_beta + i * dim;
    for (int64_t k = 0; k < m; ++k) {
      const int64_t b = q.bits[k];
      if (b == 0) continue;
      const int32_t lo = qmin(b), hi = qmax(b);
      const float alpha = q.alpha[k], flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
      float ga = 0.0f, gp = 0.0f;
      for (int64_t d = 0; d < dim; ++d) {
        const float x = (w[d] - q.beta[d]) / alpha;
        const bool inside = x >= flo && x <= fhi;
        const float value = lsq_plus_value(w[d], q.beta[d], alpha, lo, hi);
        const float pg = p[k] * g[d];
        gp += g[d] * value;
        if (inside) {
          gw[d] += pg;
          ga += pg * (nearbyintf(x) - x);
        } else {
          ga += pg * (x < flo ? flo : fhi);
          gb[d] += a.scale[k] * pg;
        }
      }
      a.part_alpha[i * m + k] = ga;
      a.part_probs[i * m + k] = gp;
    }
  }
}

QEMBED_ISA_END
}  // namespace qembed
