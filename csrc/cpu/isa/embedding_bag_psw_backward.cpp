// embedding_bag_psw_backward's kernel, for one instruction set (compiled once per variant,
// dispatch.h): each row dequantized in registers, dotted with its bag's gradient.
#include "embedding_bag_psw_backward.h"
#include "../../layout.h"
#include "../row_codec.h"

namespace qembed {
QEMBED_ISA_BEGIN

void embedding_bag_psw_backward_positions(const PswBackwardArgs& a, int64_t begin, int64_t end,
                                          float* value) {
  const int64_t dim = a.dim;
  QEMBED_DISPATCH_BITS(a.bits, [&] {
    for (int64_t p = begin; p < end; ++p) {
      if (a.indices[p] == a.padding_idx) continue;
      const uint8_t* row = a.table + a.indices[p] * a.stride;
      const RowParams prm = row_params(row, dim, BITS, a.fmt, a.table_step);
      for (int64_t d = 0; d < dim; ++d) value[d] = 0.0f;
      accumulate_row<BITS>(row, dim, prm.scale, prm.bias, prm.offset, value);
      const float* g = a.grad_out + a.bag[p] * dim;
      float dot = 0.0f;
      for (int64_t d = 0; d < dim; ++d) dot += g[d] * value[d];
      a.out[p] = dot;
    }
  });
}

QEMBED_ISA_END
}  // namespace qembed
