// The gradient of one distinct row of a backward (isa/embedding_bags_backward.h's runs): the
// one summation embedding_bags_backward, embedding_bags_backward_update and the single-table
// embedding_bag_backward share, so that all give a row the same bits.
#pragma once
#include <cstdint>
#include "../isa_namespace.h"
#include "isa/embedding_bags_backward.h"

namespace qembed {
QEMBED_ISA_BEGIN

// Positions ahead whose gradient row is fetched: rows in row order read grad_out's rows in
// no order, and a small table's run holds many positions, so the fetch runs ahead over the
// table's positions rather than over its runs. Prefetched with prefetcht1 (into L2 on Zen
// 4), not prefetcht0: the Criteo-shaped collection's training step spent 7.5-9.3 ms in the
// fused backward and update with prefetcht0, 6.9-8.1 ms with prefetcht1 (Zen 4, each a
// minimum over 57 steps, 7 turns); either way most of that op's own time waits on memory.
constexpr int64_t kPositionPrefetch = 16;

// acc[0, dim) <- the sum over table t's run k (of num_runs) of its positions' gradients
// times their factors, in position order.
QEMBED_INLINE void sum_run_gradient(const BagsBackwardArgs& a, int64_t t, int64_t k,
                                    int64_t num_runs, float* acc) {
  const int64_t dim = a.dims[t], n = a.num_positions[t];
  const int64_t* offset = a.offset[t];
  const float* factor = a.factor[t];
  const int64_t j0 = a.starts[t][k];
  const int64_t j1 = k + 1 < num_runs ? a.starts[t][k + 1] : n;
  for (int64_t d = 0; d < dim; ++d) acc[d] = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    if (j + kPositionPrefetch < n) {
      const float* ahead = a.grad_out + offset[j + kPositionPrefetch];
      for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(ahead + d, 0, 2);
    }
    const float f = factor[j];
    const float* g = a.grad_out + offset[j];
    for (int64_t d = 0; d < dim; ++d) acc[d] += g[d] * f;
  }
}

QEMBED_ISA_END
}  // namespace qembed
