// embedding_bags_psw_backward's kernel (the op: cpu/embedding_bags_psw_backward.cpp), one per
// instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"

namespace qembed {

// One feature of the batch and the table it reads, as the op has checked them.
struct BagsPswBackwardArgs {
  const float* grad_out;  // [B, width]; the feature's block starts at `column`
  int64_t width, column;
  const int64_t* values;
  const int64_t* offsets;  // the feature's B + 1 offsets into values
  const uint8_t* table;    // packed rows (layout.h)
  int64_t stride, bits, dim, fmt;
  float table_step;  // SYM_TABLE
  float* out;        // one per value
};

// out[p] = <grad_out[b, block], row[values[p]]> for the positions p of bags [begin, end);
// scratch holds dim floats.
QEMBED_DECLARE_CPU_KERNEL(void embedding_bags_psw_backward_bags(const BagsPswBackwardArgs& a,
                                                                int64_t begin, int64_t end,
                                                                float* scratch))

}  // namespace qembed
