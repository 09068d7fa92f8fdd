// embedding_bag_psw_backward's kernel (the op: cpu/embedding_bag_psw_backward.cpp), one per
// instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"

namespace qembed {

struct PswBackwardArgs {
  const float* grad_out;  // [bags or positions, dim]
  const uint8_t* table;   // packed rows (layout.h), indices checked
  int64_t stride, bits, dim, fmt;
  float table_step;  // SYM_TABLE
  const int64_t* indices;
  const int64_t* bag;  // the output row of each position
  int64_t padding_idx;
  float* out;  // zeros, one per position
};

// out[p] = <grad_out[bag[p]], row[indices[p]]> for positions [begin, end); scratch holds dim
// floats.
QEMBED_DECLARE_CPU_KERNEL(void embedding_bag_psw_backward_positions(const PswBackwardArgs& a,
                                                                    int64_t begin, int64_t end,
                                                                    float* scratch))

}  // namespace qembed
