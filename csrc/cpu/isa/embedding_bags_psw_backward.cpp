// embedding_bags_psw_backward's kernel, for one instruction set (compiled once per variant,
// dispatch.h): each row dequantized in registers, dotted with its bag's gradient block.
#include "embedding_bags_psw_backward.h"
#include "../../layout.h"
#include "../row_dot.h"

namespace qembed {
QEMBED_ISA_BEGIN

void embedding_bags_psw_backward_bags(const BagsPswBackwardArgs& a, int64_t begin, int64_t end,
                                      float* value) {
  QEMBED_DISPATCH_BITS(a.bits, [&] {
    for (int64_t b = begin; b < end; ++b) {
      const float* g = a.grad_out + b * a.width + a.column;
      for (int64_t p = a.offsets[b]; p < a.offsets[b + 1]; ++p)
        a.out[p] = row_dot<BITS>(a.table + a.values[p] * a.stride, a.dim, a.fmt, a.table_step,
                                 g, value);
    }
  });
}

QEMBED_ISA_END
}  // namespace qembed
