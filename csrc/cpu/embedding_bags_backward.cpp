// embedding_bags_backward: the gradient of the many-table lookup with respect to the rows it
// read, per table, one row per distinct index (never a dense [R, D] gradient). A table's
// positions are those of all its features, in the order of values; they are ordered by row
// with a stable sort, so repeats keep that order, and each distinct row is summed by one
// thread in it (bags_training.h): the result is the same for any thread count, and a table
// read by one feature gets the bits embedding_bag_backward gives it. The kernel
// (isa/embedding_bags_backward.cpp) sums.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <cstring>
#include <tuple>
#include <vector>
#include "../checks.h"
#include "bags_training.h"
#include "huge_pages.h"
#include "isa/embedding_bags_backward.h"

namespace qembed {
namespace {

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> embedding_bags_backward_cpu(
    const at::Tensor& grad_out_in, c10::IntArrayRef dims, c10::IntArrayRef feature_tables,
    c10::IntArrayRef feature_columns, c10::IntArrayRef poolings, const at::Tensor& values_in,
    const at::Tensor& offsets_in, const c10::optional<at::Tensor>& psw_in) {
  const char* op = "qembed.embedding_bags_backward: ";
  const BagsShape shape = check_bags_backward_args(op, grad_out_in, dims, feature_tables,
                                                   feature_columns, poolings, values_in,
                                                   offsets_in, psw_in);
  const int64_t num_tables = static_cast<int64_t>(dims.size());
  const at::Tensor grad_out = grad_out_in.to(at::kFloat).contiguous();
  const RowRuns runs = row_runs(op, num_tables, shape, feature_tables, feature_columns,
                                poolings, values_in, offsets_in, psw_in);

  std::vector<at::Tensor> unique_rows, grad_rows;
  std::vector<float*> out;
  for (int64_t t = 0; t < num_tables; ++t) {
    const int64_t u = runs.num_rows[t];
    unique_rows.push_back(at::empty({u}, values_in.options().dtype(at::kLong)));
    if (u > 0)
      std::memcpy(unique_rows[t].data_ptr<int64_t>(), runs.rows_ptr[t], u * sizeof(int64_t));
    grad_rows.push_back(empty_on_huge_pages({u, dims[t]}, grad_out.options()));
    out.push_back(grad_rows[t].data_ptr<float>());
  }
  const BagsBackwardArgs args = runs.args(grad_out, dims, out.data());
  parallel_over_runs(runs, 1, [&](int64_t begin, int64_t end) {
    QEMBED_CPU_KERNEL(embedding_bags_backward_rows)(args, begin, end);
  });
  return {unique_rows, grad_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) {
  m.impl("embedding_bags_backward", &embedding_bags_backward_cpu);
}

}  // namespace qembed
