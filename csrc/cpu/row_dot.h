// The gradient of a lookup with respect to a per-sample weight: the dot product of the
// bag's output gradient with the row read, shared by the single- and many-table kernels
// (isa/embedding_bag_psw_backward.cpp, isa/embedding_bags_psw_backward.cpp).
#pragma once
#include <cstdint>
#include "row_codec.h"

namespace qembed {
QEMBED_ISA_BEGIN

// <g, row's values> over dim, the row decoded into `value` (padded_dim(dim) floats of
// scratch: codes come in whole groups) as dequantize rounds it, the products added left to
// right (the reference's order).
template <int BITS>
inline float row_dot(const uint8_t* row, int64_t dim, int64_t fmt, float table_step,
                     const float* g, float* value) {
  const RowParams prm = row_params(row, dim, BITS, fmt, table_step);
  const int64_t width = padded_dim(dim);
  for (int64_t d = 0; d < width; ++d) value[d] = 0.0f;
  accumulate_row<BITS>(row, width, prm.scale, prm.bias, prm.offset, value);
  float dot = 0.0f;
  for (int64_t d = 0; d < dim; ++d) dot += g[d] * value[d];
  return dot;
}

QEMBED_ISA_END
}  // namespace qembed
