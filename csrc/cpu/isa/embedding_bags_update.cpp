// embedding_bags_update's kernel, for one instruction set (compiled once per variant,
// dispatch.h); the per-row work is update_row.h's, as in lowp_update.
#include "embedding_bags_update.h"
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
    const int n = next_rows(table, k, end - i);  // rows updated together: one table's
    QEMBED_DISPATCH_BITS(table.bits, [&] { update_stored_rows<BITS>(table, k, n, scratch); });
    i += n;
  }
}

QEMBED_ISA_END
}  // namespace qembed
