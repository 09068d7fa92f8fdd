// embedding_bag_backward's kernel (the op: cpu/embedding_bag_backward.cpp), one per
// instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"

namespace qembed {

// The positions in index order (pos[j], with index key[j]) and the runs of equal indices.
struct BackwardArgs {
  const float* grad_out;  // [bags or positions, dim]
  int64_t dim;
  const int64_t* pos;
  const int64_t* key;
  int64_t used;           // positions in bags
  const int64_t* runs;    // run k starts at j = runs[k]
  const int64_t* bag;     // the output row of each position
  const float* factor;    // the factor of each position's gradient
  int64_t* unique_rows;   // [U]
  float* grad_rows;       // [U, dim]
};

// Distinct rows [begin, end): each run's gradients summed in position order.
QEMBED_DECLARE_CPU_KERNEL(void embedding_bag_backward_rows(const BackwardArgs& a, int64_t begin,
                                                           int64_t end))

}  // namespace qembed
