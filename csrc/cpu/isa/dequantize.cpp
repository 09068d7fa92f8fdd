// dequantize's kernel, for one instruction set (compiled once per variant, dispatch.h).
#include "dequantize.h"
#include "../../layout.h"
#include "../row_codec.h"

namespace qembed {
QEMBED_ISA_BEGIN

void dequantize_rows(const DequantizeArgs& a, int64_t begin, int64_t end) {
  QEMBED_DISPATCH_BITS(a.bits, [&] {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = a.rows + r * a.stride;
      const RowParams p = row_params(row, a.dim, BITS, a.fmt, a.table_step);
      accumulate_row<BITS>(row, a.dim, p.scale, p.bias, p.offset, a.out + r * a.dim);
    }
  });
}

QEMBED_ISA_END
}  // namespace qembed
