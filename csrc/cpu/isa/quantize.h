// quantize's kernel (the op: cpu/quantize.cpp), one per instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"

namespace qembed {

// fp32 rows [n, dim] -> packed rows [n, stride] (layout.h), as the op has checked them.
struct QuantizeArgs {
  const float* weight;
  int64_t dim, bits, fmt;
  const float* steps;  // symmetric formats: one step per row, or one for all (num_steps 1)
  int64_t num_steps;
  bool stochastic;
  uint64_t seed, counter;
  uint8_t* out;
  int64_t stride;
};

// Rows [begin, end): their parameters and codes.
QEMBED_DECLARE_CPU_KERNEL(void quantize_rows(const QuantizeArgs& a, int64_t begin, int64_t end))

}  // namespace qembed
