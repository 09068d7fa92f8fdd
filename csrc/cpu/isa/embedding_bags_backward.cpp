// embedding_bags_backward's kernel, for one instruction set (compiled once per variant,
// dispatch.h).
#include "embedding_bags_backward.h"

namespace qembed {
QEMBED_ISA_BEGIN

// Distinct rows ahead whose first gradient row is prefetched.
constexpr int64_t kGradPrefetch = 8;

void embedding_bags_backward_rows(const BagsBackwardArgs& a, int64_t begin, int64_t end) {
  int64_t t = 0;
  while (begin >= a.item_start[t + 1]) ++t;
  for (int64_t i = begin; i < end; ++i) {
    while (i >= a.item_start[t + 1]) ++t;
    const int64_t k = i - a.item_start[t], dim = a.dims[t];
    const int64_t num_runs = a.item_start[t + 1] - a.item_start[t];
    const int64_t* pos = a.pos[t];
    const int64_t* starts = a.starts[t];
    // Rows in row order read grad_out's rows in no order: fetch a later row's first early.
    if (k + kGradPrefetch < num_runs) {
      const int64_t p = pos[starts[k + kGradPrefetch]];
      const float* g = a.grad_out + a.bag[p] * a.width + a.column[p];
      for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(g + d, 0, 3);
    }
    const int64_t j0 = starts[k], j1 = k + 1 < num_runs ? starts[k + 1] : a.num_positions[t];
    float* acc = a.grad_rows[t] + k * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] = 0.0f;
    a.unique_rows[t][k] = a.key[t][j0];
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t p = pos[j];
      const float f = a.factor[p];
      const float* g = a.grad_out + a.bag[p] * a.width + a.column[p];
      for (int64_t d = 0; d < dim; ++d) acc[d] += g[d] * f;
    }
  }
}

QEMBED_ISA_END
}  // namespace qembed
