// Mixed-precision embeddings (MPE): the search's LSQ+ quantizer per candidate width and the
// argument checks its two CPU ops share.
//   Q_b(w) = alpha_b * clamp(round((w - beta) / alpha_b), Qn_b, Qp_b) + beta,   Q_0 = 0.
// The arithmetic order matches qembed/reference.py (mpe_search_forward).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <vector>
#include "../checks.h"
#include "../lsq_plus.h"

namespace qembed {

// The quantizer of the search: candidate widths, steps alpha [m], offset beta [D], the
// group of every row [R] and the groups' probabilities [G, m].
struct SearchQuantizer {
  std::vector<int64_t> bits;
  const float* alpha;
  const float* beta;
  const int64_t* row_group;
  const float* probs;
  int64_t dim;
  int64_t num_candidates() const { return static_cast<int64_t>(bits.size()); }
  const float* probs_of(int64_t row) const { return probs + row_group[row] * num_candidates(); }
};

// out[d] = sum over candidates b > 0 (in order) of p_b * Q_b(w)_d.
inline void expected_row(const float* w, const SearchQuantizer& q, const float* p, float* out) {
  std::fill(out, out + q.dim, 0.0f);
  for (int64_t k = 0; k < q.num_candidates(); ++k) {
    const int64_t b = q.bits[k];
    if (b == 0) continue;
    const int32_t lo = qmin(b), hi = qmax(b);
    for (int64_t d = 0; d < q.dim; ++d)
      out[d] = out[d] + p[k] * lsq_plus_value(w[d], q.beta[d], q.alpha[k], lo, hi);
  }
}

// Checks the search's tensors (contiguous copies are the caller's) and their values, and
// returns its view.
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
  return {bits.vec(), a, beta.data_ptr<float>(), g, probs.data_ptr<float>(), dim};
}

}  // namespace qembed
