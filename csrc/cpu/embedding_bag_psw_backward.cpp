// embedding_bag_psw_backward: d out / d per_sample_weights[p] = <grad_out[bag(p)], row[p]>,
// the row dequantized in registers (isa/embedding_bag_psw_backward.cpp); zero for padding_idx
// and positions outside every bag.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "../padded_rows.h"
#include "bags.h"
#include "isa/embedding_bag_psw_backward.h"

namespace qembed {
namespace {

at::Tensor embedding_bag_psw_backward_cpu(const at::Tensor& grad_out_in,
                                          const at::Tensor& rows_in,
                                          const at::Tensor& indices_in,
                                          const at::Tensor& offsets_in,
                                          const c10::optional<at::Tensor>& step, int64_t bits,
                                          int64_t true_dim, int64_t fmt, int64_t mode,
                                          bool include_last_offset, int64_t padding_idx) {
  const int64_t num_out =
      check_psw_backward_args(grad_out_in, rows_in, indices_in, offsets_in, step, bits,
                              true_dim, fmt, mode, include_last_offset);
  // zero gradient on the pad columns: they add nothing to the dot products
  const at::Tensor grad_out = pad_columns(grad_out_in.to(at::kFloat)).contiguous();
  const int64_t dim = grad_out.size(1);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t n = indices.numel(), stride = rows.size(1);
  const int64_t* idx = indices.data_ptr<int64_t>();
  check_indices_in_range(idx, n, rows.size(0));
  std::vector<int64_t> bag;
  if (mode == POOL_NONE) {
    bag.resize(n);
    for (int64_t p = 0; p < n; ++p) bag[p] = p;
  } else {
    const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
    bag = bag_of_positions(bag_bounds(offsets.data_ptr<int64_t>(), offsets.numel(), num_out, n));
  }
  const float table_step = fmt == SYM_TABLE ? step->item<float>() : 0.0f;
  at::Tensor out = at::zeros({n}, grad_out.options());
  const PswBackwardArgs args{grad_out.data_ptr<float>(), rows.data_ptr<uint8_t>(), stride, bits,
                            dim, fmt, table_step, idx, bag.data(), padding_idx,
                            out.data_ptr<float>()};
  at::parallel_for(0, static_cast<int64_t>(bag.size()), 256, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(padded_dim(dim));
    QEMBED_CPU_KERNEL(embedding_bag_psw_backward_positions)(args, begin, end, scratch.data());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) {
  m.impl("embedding_bag_psw_backward", &embedding_bag_psw_backward_cpu);
}

}  // namespace qembed
