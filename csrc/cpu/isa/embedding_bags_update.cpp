// embedding_bags_update's kernel, for one instruction set (compiled once per variant,
// dispatch.h); the per-row work is update_row.h's, as in lowp_update.
#include "embedding_bags_update.h"
#include <algorithm>
#include "../../layout.h"
#include "../update_row.h"

namespace qembed {
QEMBED_ISA_BEGIN

void embedding_bags_update_rows(const BagsUpdateArgs& a, int64_t begin, int64_t end,
                                float* scratch) {
  int64_t t = 0;
  while (begin >= a.item_start[t + 1]) ++t;
  for (int64_t i = begin; i < end;) {
    while (i >= a.item_start[t + 1]) ++t;
    const UpdateArgs& table = a.tables[t];
    const int64_t k = i - a.item_start[t];
    // Rows updated together come from one table.
    const int64_t width = padded_dim(table.config.dim);
    const int n = static_cast<int>(
        std::min<int64_t>({rows_together(width), end - i, table.num_unique - k}));
    const float* grads[kRowsTogether];
    for (int j = 0; j < n; ++j) {
      if (k + j + kUpdatePrefetchDistance < table.num_unique &&
          i + j + kUpdatePrefetchDistance < end)
        prefetch_unique_row(table, k + j + kUpdatePrefetchDistance);
      grads[j] = table.grad + (k + j) * width;
    }
    QEMBED_DISPATCH_BITS(table.bits,
                         [&] { update_unique_rows<BITS>(table, k, n, grads, scratch); });
    i += n;
  }
}

QEMBED_ISA_END
}  // namespace qembed
