// dequantize's kernel (the op: cpu/dequantize.cpp), one per instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"

namespace qembed {

// Packed rows -> fp32 [n, dim].
struct DequantizeArgs {
  const uint8_t* rows;
  int64_t stride, bits, dim, fmt;
  float table_step;  // SYM_TABLE
  float* out;        // zeros
};

// Rows [begin, end) decoded into out.
QEMBED_DECLARE_CPU_KERNEL(void dequantize_rows(const DequantizeArgs& a, int64_t begin,
                                               int64_t end))

}  // namespace qembed
