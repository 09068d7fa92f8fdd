// quantize: fp32 rows -> packed rows with their parameters inline (layout.h).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include "../checks.h"
#include "../padded_rows.h"
#include "huge_pages.h"
#include "row_codec.h"

namespace qembed {
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

at::Tensor quantize_cpu(const at::Tensor& weight_in, int64_t bits, int64_t fmt,
                        const c10::optional<at::Tensor>& step_in, bool stochastic, int64_t seed,
                        int64_t counter) {
  check_quantize_args(weight_in, bits, fmt, step_in);
  const at::Tensor weight =
      (fmt == AFFINE ? pad_columns_with_row_min(weight_in) : pad_columns(weight_in)).contiguous();
  const int64_t n = weight.size(0), dim = weight.size(1);
  const float* w = weight.data_ptr<float>();
  for (int64_t i = 0; i < weight.numel(); ++i)
    TORCH_CHECK_VALUE(std::isfinite(w[i]), "qembed.quantize: weight has a non-finite value at ",
                      "row ", i / dim, ", column ", i % dim);

  at::Tensor step;
  if (fmt != AFFINE) {
    step = step_in->contiguous();
    const float* s = step.data_ptr<float>();
    for (int64_t i = 0; i < step.numel(); ++i)
      TORCH_CHECK_VALUE(std::isfinite(s[i]) && s[i] > 0.0f,
                        "qembed.quantize: steps must be positive and finite, got ", s[i]);
  }

  const int64_t stride = row_bytes(dim, bits, fmt);
  at::Tensor out = zeros_for_table({n, stride}, weight.options().dtype(at::kByte));
  uint8_t* dst = out.data_ptr<uint8_t>();
  QEMBED_DISPATCH_BITS(bits, [&] {
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* wr = w + r * dim;
        uint8_t* row = dst + r * stride;
        uint8_t* params = row + param_offset(dim, BITS);
        RowParams p;
        if (fmt == AFFINE) {
          p = affine_params(wr, dim, BITS);
          write_f32(params, p.scale);
          write_f32(params + 4, p.bias);
        } else {
          const float s = step.data_ptr<float>()[step.numel() == 1 ? 0 : r];
          p = {s, 0.0f, qmin(BITS)};
          if (fmt == SYM_ROW) write_f32(params, s);
        }
        const RoundingKey key{stochastic, static_cast<uint64_t>(seed),
                              static_cast<uint64_t>(counter), static_cast<uint64_t>(r)};
        encode_row<BITS>(wr, dim, p, key, row);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("quantize", &quantize_cpu); }

}  // namespace qembed
