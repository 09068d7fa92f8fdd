// embedding_bags_psw_backward: d out / d per_sample_weights[p] = <grad_out[bag(p), block of
// p's feature], row[p]>, the row dequantized as embedding_bag_psw_backward does
// (isa/embedding_bags_psw_backward.cpp).
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <vector>
#include "../checks.h"
#include "isa/embedding_bags_psw_backward.h"

namespace qembed {
namespace {

at::Tensor embedding_bags_psw_backward_cpu(
    const at::Tensor& grad_out_in, at::TensorList tables, at::TensorList steps,
    c10::IntArrayRef bits, c10::IntArrayRef dims, c10::IntArrayRef formats,
    c10::IntArrayRef feature_tables, c10::IntArrayRef feature_columns,
    const at::Tensor& values_in, const at::Tensor& offsets_in) {
  const char* op = "qembed.embedding_bags_psw_backward: ";
  const BagsShape shape = check_bags_psw_backward_args(grad_out_in, tables, steps, bits, dims,
                                                       formats, feature_tables, feature_columns,
                                                       values_in, offsets_in);
  const int64_t batch = shape.batch_size, width = shape.width;
  const at::Tensor grad_out = grad_out_in.to(at::kFloat).contiguous();
  const at::Tensor values = values_in.to(at::kLong).contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t* idx = values.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t n = values.numel(), num_features = static_cast<int64_t>(feature_tables.size());
  check_bags_offsets_values(op, off, offsets.numel(), std::max<int64_t>(batch, 1), n);
  std::vector<at::Tensor> rows;
  std::vector<int64_t> num_rows;
  for (const at::Tensor& t : tables) {
    rows.push_back(t.contiguous());
    num_rows.push_back(t.size(0));
  }
  check_bags_ids_values(op, idx, off, batch, feature_tables, num_rows);
  at::Tensor out = at::zeros({n}, grad_out.options());
  float* dst = out.data_ptr<float>();
  const float* go = grad_out.data_ptr<float>();
  // One feature at a time, its positions split over the threads.
  for (int64_t f = 0; f < num_features; ++f) {
    const int64_t t = feature_tables[f], dim = dims[t], fmt = formats[t];
    const uint8_t* table = rows[t].data_ptr<uint8_t>();
    const int64_t stride = rows[t].size(1);
    const float table_step = fmt == SYM_TABLE ? steps[t].item<float>() : 0.0f;
    const BagsPswBackwardArgs args{go, width, feature_columns[f], idx, off + f * batch,
                                   table, stride, bits[t], dim, fmt, table_step, dst};
    at::parallel_for(0, batch, 256, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(padded_dim(dim));
      QEMBED_CPU_KERNEL(embedding_bags_psw_backward_bags)(args, begin, end, scratch.data());
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) {
  m.impl("embedding_bags_psw_backward", &embedding_bags_psw_backward_cpu);
}

}  // namespace qembed
