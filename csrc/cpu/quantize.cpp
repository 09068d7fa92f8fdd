// quantize: fp32 rows -> packed rows with their parameters inline (layout.h). The op checks
// the values and splits the rows over threads; the kernel (isa/quantize.cpp) encodes them.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include "../checks.h"
#include "../padded_rows.h"
#include "huge_pages.h"
#include "isa/quantize.h"

namespace qembed {
namespace {

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
  const QuantizeArgs args{w, dim, bits, fmt, step.defined() ? step.data_ptr<float>() : nullptr,
                          step.defined() ? step.numel() : 0, stochastic,
                          static_cast<uint64_t>(seed), static_cast<uint64_t>(counter),
                          out.data_ptr<uint8_t>(), stride};
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    QEMBED_CPU_KERNEL(quantize_rows)(args, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("quantize", &quantize_cpu); }

}  // namespace qembed
