// embedding_bags_backward's kernel, for one instruction set (compiled once per variant,
// dispatch.h).
#include "embedding_bags_backward.h"
#include "../run_gradient.h"

namespace qembed {
QEMBED_ISA_BEGIN

void embedding_bags_backward_rows(const BagsBackwardArgs& a, int64_t begin, int64_t end) {
  int64_t t = 0;
  while (begin >= a.item_start[t + 1]) ++t;
  for (int64_t i = begin; i < end; ++i) {
    while (i >= a.item_start[t + 1]) ++t;
    const int64_t k = i - a.item_start[t];
    const int64_t num_runs = a.item_start[t + 1] - a.item_start[t];
    sum_run_gradient(a, t, k, num_runs, a.grad_rows[t] + k * a.dims[t]);
  }
}

QEMBED_ISA_END
}  // namespace qembed
