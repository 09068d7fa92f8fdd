// lowp_update's kernels: the fused low-precision training step of cpu/lowp_update.cpp, for
// one instruction set (compiled once per variant, dispatch.h); the per-row work is
// update_row.h's.
#include "lowp_update.h"
#include "../../layout.h"
#include "../update_row.h"

namespace qembed {
QEMBED_ISA_BEGIN

void lowp_update_rows(const UpdateArgs& a, int64_t begin, int64_t end, float* scratch) {
  QEMBED_DISPATCH_BITS(a.bits, [&] {
    for (int64_t k = begin; k < end;) {
      const int n = next_rows(a, k, end - k);
      update_stored_rows<BITS>(a, k, n, scratch);
      k += n;
    }
  });
}

float lowp_update_table_step(const UpdateArgs& a, int64_t num_skipped) {
  float gs = 0.0f;
  for (int64_t k = 0; k < a.num_unique; ++k)
    if (!a.skipped[k]) gs += a.lsq[k];
  const float gscale = lsq_scale(qmax(a.bits), (a.num_unique - num_skipped) * a.config.dim);
  const float s = next_step(*a.table.table_step, gscale * gs, a.table.step_state, a.config);
  *a.table.table_step = s;
  return s;
}

void lowp_update_encode(const UpdateArgs& a, int64_t begin, int64_t end, float step) {
  const int64_t width = padded_dim(a.config.dim);
  QEMBED_DISPATCH_BITS(a.bits, [&] {
    for (int64_t k = begin; k < end; ++k) {
      if (a.skipped[k]) continue;
      RoundingKey key = a.rounding;
      key.row_key = key.row_offset + static_cast<uint64_t>(a.unique_rows[k]);
      encode_row<BITS>(a.kept + k * width, width, RowParams{step, 0.0f, qmin(BITS)}, key,
                       a.table.rows + a.unique_rows[k] * a.table.stride);
    }
  });
}

QEMBED_ISA_END
}  // namespace qembed
