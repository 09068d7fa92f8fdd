// quantize's kernel, for one instruction set (compiled once per variant, dispatch.h).
#include "quantize.h"
#include <algorithm>
#include "../../layout.h"
#include "../row_codec.h"

namespace qembed {
QEMBED_ISA_BEGIN
namespace {

// Affine parameters of a row: bias = min, scale = (max - min) / (2^b - 1), 1 if constant.
RowParams affine_params(const float* w, int64_t dim, int64_t bits) {
  float lo = w[0], hi = w[0];
  for (int64_t d = 1; d < dim; ++d) {
    lo = std::min(lo, w[d]);
    hi = std::max(hi, w[d]);
  }
  float scale = (hi - lo) / static_cast<float>(code_mask(bits));
  if (!(scale > 0.0f)) scale = 1.0f;
  return {scale, lo, 0};
}

}  // namespace

void quantize_rows(const QuantizeArgs& a, int64_t begin, int64_t end) {
  QEMBED_DISPATCH_BITS(a.bits, [&] {
    for (int64_t r = begin; r < end; ++r) {
      const float* w = a.weight + r * a.dim;
      uint8_t* row = a.out + r * a.stride;
      uint8_t* params = row + param_offset(a.dim, BITS);
      RowParams p;
      if (a.fmt == AFFINE) {
        p = affine_params(w, a.dim, BITS);
        write_f32(params, p.scale);
        write_f32(params + 4, p.bias);
      } else {
        const float s = a.steps[a.num_steps == 1 ? 0 : r];
        p = {s, 0.0f, qmin(BITS)};
        if (a.fmt == SYM_ROW) write_f32(params, s);
      }
      const RoundingKey key{a.stochastic, a.seed, a.counter, static_cast<uint64_t>(r)};
      encode_row<BITS>(w, a.dim, p, key, row);
    }
  });
}

QEMBED_ISA_END
}  // namespace qembed
