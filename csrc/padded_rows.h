// Rows of any embedding dim D: the kernels work on whole groups of 8 codes (layout.h), so
// where D is not a multiple of 8 the CPU and CUDA entry points widen their fp32 and code
// inputs to padded_dim(D) columns and narrow their outputs back to D. For multiples of 8
// both are the identity: no copy.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include "layout.h"

namespace qembed {

// t [N, D] -> [N, padded_dim(D)], the new columns `fill`.
inline at::Tensor pad_columns(const at::Tensor& t, double fill = 0.0) {
  const int64_t dim = t.size(1), width = padded_dim(dim);
  return width == dim ? t : at::constant_pad_nd(t, {0, width - dim}, fill);
}

// Affine rows [N, D] padded with each row's minimum: the row's scale and bias stay those of
// its D values, and the pad encodes as code 0.
inline at::Tensor pad_columns_with_row_min(const at::Tensor& t) {
  const int64_t dim = t.size(1), width = padded_dim(dim);
  if (width == dim) return t;
  return at::cat({t, t.amin(1, true).expand({t.size(0), width - dim})}, 1);
}

// The first `dim` columns of t [N, >= dim], contiguous.
inline at::Tensor narrow_columns(const at::Tensor& t, int64_t dim) {
  return t.size(1) == dim ? t : t.narrow(1, 0, dim).contiguous();
}

}  // namespace qembed
