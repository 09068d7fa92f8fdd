// embedding_bags_update's kernel (the op: cpu/embedding_bags_update.cpp), one per instruction
// set. Each table's update is lowp_update's (isa/lowp_update.h), second pass included.
#pragma once
#include <cstdint>
#include "../dispatch.h"
#include "lowp_update.h"

namespace qembed {

// Work item i of [0, item_start[T]) is distinct row i - item_start[t] of table t.
struct BagsUpdateArgs {
  const UpdateArgs* tables;   // [T]
  const int64_t* item_start;  // [T + 1]
};

// Items [begin, end), each row updated as lowp_update_rows updates it; scratch holds
// 3 * kRowsTogether * (the largest padded dim) floats.
QEMBED_DECLARE_CPU_KERNEL(void embedding_bags_update_rows(const BagsUpdateArgs& a, int64_t begin,
                                                          int64_t end, float* scratch))

}  // namespace qembed
