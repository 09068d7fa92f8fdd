// Mixed-precision embeddings (MPE): the argument checks of the search's two CPU ops, which
// give its LSQ+ quantizer (isa/mpe_search.h) to their kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <cmath>
#include "../checks.h"
#include "isa/mpe_search.h"

namespace qembed {

// Checks the search's tensors (contiguous copies are the caller's; `bits` outlives the view)
// and their values, and returns its view.
inline SearchQuantizer search_quantizer(const char* op, const at::Tensor& weight,
                                        const at::Tensor& row_group, const at::Tensor& probs,
                                        const at::Tensor& alpha, const at::Tensor& beta,
                                        c10::IntArrayRef bits) {
  check_search_args(op, weight, row_group, probs, alpha, beta, bits);
  const int64_t rows = weight.size(0), dim = weight.size(1);
  const int64_t m = static_cast<int64_t>(bits.size());
  const int64_t* g = row_group.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_INDEX(g[r] >= 0 && g[r] < probs.size(0), "qembed.", op, ": row_group[", r,
                      "] = ", g[r], " is not a group of probs (", probs.size(0), " groups)");
  const float* a = alpha.data_ptr<float>();
  for (int64_t k = 0; k < m; ++k)
    TORCH_CHECK_VALUE(bits[k] == 0 || (std::isfinite(a[k]) && a[k] > 0), "qembed.", op,
                      ": alpha must be positive and finite, got ", a[k], " for ", bits[k],
                      " bits");
  return {bits.data(), m, a, beta.data_ptr<float>(), g, probs.data_ptr<float>(), dim};
}

}  // namespace qembed
