// embedding_bag_psw_backward's kernel, for one instruction set (compiled once per variant,
// dispatch.h): each row dequantized in registers, dotted with its bag's gradient.
#include "embedding_bag_psw_backward.h"
#include "../../layout.h"
#include "../row_dot.h"

namespace qembed {
QEMBED_ISA_BEGIN

void embedding_bag_psw_backward_positions(const PswBackwardArgs& a, int64_t begin, int64_t end,
                                          float* value) {
  QEMBED_DISPATCH_BITS(a.bits, [&] {
    for (int64_t p = begin; p < end; ++p) {
      if (a.indices[p] == a.padding_idx) continue;
      a.out[p] = row_dot<BITS>(a.table + a.indices[p] * a.stride, a.dim, a.fmt, a.table_step,
                               a.grad_out + a.bag[p] * a.dim, value);
    }
  });
}

QEMBED_ISA_END
}  // namespace qembed
