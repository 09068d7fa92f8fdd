// embedding_bags_backward_update's kernel (the op: cpu/embedding_bags_backward_update.cpp),
// one per instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"
#include "embedding_bags_backward.h"
#include "embedding_bags_update.h"

namespace qembed {

// Work items [begin, end) (a (table, distinct row) each, the same items in both arguments):
// the row's gradient summed as embedding_bags_backward_rows sums it, then the row updated as
// embedding_bags_update_rows updates it. scratch holds 4 * kRowsTogether * (the largest
// padded dim) floats.
QEMBED_DECLARE_CPU_KERNEL(void embedding_bags_backward_update_rows(const BagsBackwardArgs& g,
                                                                   const BagsUpdateArgs& u,
                                                                   int64_t begin, int64_t end,
                                                                   float* scratch))

}  // namespace qembed
