// embedding_bag_backward's kernel, for one instruction set (compiled once per variant,
// dispatch.h).
#include "embedding_bag_backward.h"

namespace qembed {
QEMBED_ISA_BEGIN

void embedding_bag_backward_rows(const BackwardArgs& a, int64_t begin, int64_t end) {
  const int64_t dim = a.dim;
  for (int64_t k = begin; k < end; ++k) {
    float* acc = a.grad_rows + k * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] = 0.0f;
    const int64_t row = a.key[a.runs[k]];
    a.unique_rows[k] = row;
    for (int64_t j = a.runs[k]; j < a.used && a.key[j] == row; ++j) {
      const int64_t p = a.pos[j];
      const float f = a.factor[p];
      const float* g = a.grad_out + a.bag[p] * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += g[d] * f;
    }
  }
}

QEMBED_ISA_END
}  // namespace qembed
