// embedding_bags_backward's kernel (the op: cpu/embedding_bags_backward.cpp), one per
// instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"

namespace qembed {

// Each table's positions in row order, as the offset of each one's gradient row in grad_out
// (offset[t][j]) and the factor it is scaled by (factor[t][j]), cut into runs of one row (run
// k starts at j = starts[t][k] and ends at the next run's start, or num_positions[t]). Work
// item i of [0, item_start[T]) is run i - item_start[t] of table t.
struct BagsBackwardArgs {
  const float* grad_out;  // [B, width]
  int64_t num_tables;
  const int64_t* item_start;  // [T + 1]
  const int64_t* dims;        // [T]
  const int64_t* const* offset;
  const float* const* factor;
  const int64_t* const* starts;
  const int64_t* num_positions;  // [T]
  float* const* grad_rows;       // [T][U_t, dim_t] (embedding_bags_backward's result)
  bool large_grad_out;           // grad_out is larger than kCachedGradOutBytes
};

// An output gradient larger than this is read from memory rather than from the caches.
constexpr int64_t kCachedGradOutBytes = int64_t{8} << 20;

// Work items [begin, end): each run's gradients summed in position order into grad_rows.
QEMBED_DECLARE_CPU_KERNEL(void embedding_bags_backward_rows(const BagsBackwardArgs& a,
                                                            int64_t begin, int64_t end))

}  // namespace qembed
