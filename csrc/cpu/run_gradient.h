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
// table's positions rather than over its runs. An output gradient from memory is fetched
// with prefetcht1 (into L2 on Zen 4), one the caches hold with prefetcht0 (into L1). Zen 4:
// the Criteo-shaped collection's training step (54 MB output gradient) spent 7.5-9.3 ms in
// the fused backward and update with prefetcht0, 6.9-8.1 ms with prefetcht1 (each a minimum
// over 57 steps, 7 turns; most of the op's own time still waits on memory); the single-table
// backward of a 0.5-1 MB output gradient (bench_update_floor) took 40-46 / 49-73 ns an id at
// D = 64 / 128 with prefetcht1, 36-41 / 46-53 with prefetcht0 (7 turns).
constexpr int64_t kPositionPrefetch = 16;

// acc[0, dim) <- the sum over table t's run k (of num_runs) of its positions' gradients
// times their factors, in position order.
QEMBED_INLINE void sum_run_gradient(const BagsBackwardArgs& a, int64_t t, int64_t k,
                                    int64_t num_runs, float* acc) {
  const int64_t dim = a.dims[t], n = a.num_positions[t];
  const int64_t* offset = a.offset[t];
  const float* factor = a.factor[t];
  const float* grad_out = a.grad_out;
  const bool from_memory = a.large_grad_out;
  const int64_t j0 = a.starts[t][k];
  const int64_t j1 = k + 1 < num_runs ? a.starts[t][k + 1] : n;
  for (int64_t d = 0; d < dim; ++d) acc[d] = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    if (j + kPositionPrefetch < n) {
      const float* ahead = grad_out + offset[j + kPositionPrefetch];
      if (from_memory) {
        for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(ahead + d, 0, 2);
      } else {
        for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(ahead + d, 0, 3);
      }
    }
    const float f = factor[j];
    const float* g = grad_out + offset[j];
    for (int64_t d = 0; d < dim; ++d) acc[d] += g[d] * f;
  }
}

QEMBED_ISA_END
}  // namespace qembed
