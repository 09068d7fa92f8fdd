// embedding_bags_psw_backward: d out / d per_sample_weights[p] = <grad_out[bag(p), block of
// p's feature], row[p]>, the row dequantized as embedding_bag_psw_backward does.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "row_dot.h"

namespace qembed {
namespace {

at::Tensor embedding_bags_psw_backward_cpu(
    const at::Tensor& grad_out_in, at::TensorList tables, at::TensorList steps,
    c10::IntArrayRef bits, c10::IntArrayRef dims, c10::IntArrayRef formats,
    c10::IntArrayRef feature_tables, c10::IntArrayRef feature_columns,
    const at::Tensor& values_in, const at::Tensor& offsets_in) {
  std::vector<int64_t> poolings(feature_tables.size(), POOL_SUM);
  const BagsShape shape = check_bags_args(tables, steps, bits, dims, formats, feature_tables,
                                          feature_columns, poolings, values_in, offsets_in,
                                          c10::nullopt, at::kFloat);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 2 && grad_out_in.size(0) == shape.batch_size &&
                        grad_out_in.size(1) == shape.width,
                    "qembed.embedding_bags_psw_backward: grad_out must be [", shape.batch_size,
                    ", ", shape.width, "], got ", grad_out_in.sizes());
  const int64_t batch = shape.batch_size, width = shape.width;
  const at::Tensor grad_out = grad_out_in.to(at::kFloat).contiguous();
  const at::Tensor values = values_in.to(at::kLong).contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t* idx = values.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t n = values.numel(), num_features = static_cast<int64_t>(feature_tables.size());
  TORCH_CHECK_VALUE(off[0] == 0 && off[num_features * batch] == n,
                    "qembed.embedding_bags_psw_backward: offsets must run from 0 to the number "
                    "of values (", n, ")");
  std::vector<at::Tensor> rows;
  for (const at::Tensor& t : tables) rows.push_back(t.contiguous());
  at::Tensor out = at::zeros({n}, grad_out.options());
  float* dst = out.data_ptr<float>();
  const float* go = grad_out.data_ptr<float>();
  // One feature at a time, its positions split over the threads.
  for (int64_t f = 0; f < num_features; ++f) {
    const int64_t t = feature_tables[f], dim = dims[t], fmt = formats[t];
    const uint8_t* table = rows[t].data_ptr<uint8_t>();
    const int64_t num_rows = rows[t].size(0), stride = rows[t].size(1);
    const float table_step = fmt == SYM_TABLE ? steps[t].item<float>() : 0.0f;
    for (int64_t k = f * batch; k < (f + 1) * batch; ++k)
      TORCH_CHECK_VALUE(off[k + 1] >= off[k], "qembed.embedding_bags_psw_backward: offsets ",
                        "must be non-decreasing");
    for (int64_t p = off[f * batch]; p < off[(f + 1) * batch]; ++p)
      TORCH_CHECK_INDEX(idx[p] >= 0 && idx[p] < num_rows, "qembed.embedding_bags_psw_backward: ",
                        "feature ", f, " has id ", idx[p], " outside its table of ", num_rows,
                        " rows");
    QEMBED_DISPATCH_BITS(bits[t], [&] {
      at::parallel_for(f * batch, (f + 1) * batch, 256, [&](int64_t begin, int64_t end) {
        std::vector<float> value(dim);
        for (int64_t k = begin; k < end; ++k) {
          const float* g = go + (k - f * batch) * width + feature_columns[f];
          for (int64_t p = off[k]; p < off[k + 1]; ++p) {
            dst[p] = row_dot<BITS>(table + idx[p] * stride, dim, fmt, table_step, g,
                                   value.data());
          }
        }
      });
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) {
  m.impl("embedding_bags_psw_backward", &embedding_bags_psw_backward_cpu);
}

}  // namespace qembed
