// dequantize: packed rows -> fp32 [N, dim].
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include "../checks.h"
#include "../padded_rows.h"
#include "row_codec.h"

namespace qembed {
namespace {

at::Tensor dequantize_cpu(const at::Tensor& rows_in, int64_t bits, int64_t true_dim,
                          int64_t fmt, const c10::optional<at::Tensor>& step) {
  check_rows(rows_in, true_dim, bits, fmt);
  check_table_step(step, fmt, rows_in);
  const int64_t dim = padded_dim(true_dim);
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.size(0), stride = rows.size(1);
  const float table_step = fmt == SYM_TABLE ? step->item<float>() : 0.0f;
  at::Tensor out = at::zeros({n, dim}, rows.options().dtype(at::kFloat));
  const uint8_t* src = rows.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  QEMBED_DISPATCH_BITS(bits, [&] {
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* row = src + r * stride;
        const RowParams p = row_params(row, dim, BITS, fmt, table_step);
        accumulate_row<BITS>(row, dim, p.scale, p.bias, p.offset, dst + r * dim);
      }
    });
  });
  return narrow_columns(out, true_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("dequantize", &dequantize_cpu); }

}  // namespace qembed
