// embedding_bags_backward_update's kernel, for one instruction set (compiled once per
// variant, dispatch.h): run_gradient.h's sum and update_row.h's update, a few rows at a time,
// so a row's gradient goes from the caches straight into its update.
#include "embedding_bags_backward_update.h"
#include "../../layout.h"
#include "../run_gradient.h"
#include "../update_row.h"

namespace qembed {
QEMBED_ISA_BEGIN

void embedding_bags_backward_update_rows(const BagsBackwardArgs& g, const BagsUpdateArgs& u,
                                         int64_t begin, int64_t end, float* scratch) {
  int64_t t = 0;
  while (begin >= u.item_start[t + 1]) ++t;
  for (int64_t i = begin; i < end;) {
    while (i >= u.item_start[t + 1]) ++t;
    const UpdateArgs& table = u.tables[t];
    const int64_t k = i - u.item_start[t], num_runs = table.num_unique;
    const int64_t dim = table.config.dim, width = padded_dim(dim);
    // Rows updated together come from one table; their gradients go to the first
    // kRowsTogether * width floats of scratch, the update's buffers after them.
    const int n = next_rows(table, k, end - i);
    const float* grads[kRowsTogether];
    for (int j = 0; j < n; ++j) {
      float* grad = scratch + j * width;
      sum_run_gradient(g, t, k + j, num_runs, grad);
      for (int64_t d = dim; d < width; ++d) grad[d] = 0.0f;
      grads[j] = grad;
    }
    QEMBED_DISPATCH_BITS(table.bits, [&] {
      update_unique_rows<BITS>(table, k, n, grads, scratch + kRowsTogether * width);
    });
    i += n;
  }
}

QEMBED_ISA_END
}  // namespace qembed
