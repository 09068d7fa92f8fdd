// embedding_bag_backward: the gradient of the fused lookup with respect to the rows it read,
// one row per distinct index (never a dense [R, D] gradient).
// Positions are sorted by index with a stable sort, so repeats of an index keep their batch
// order, and each distinct index is summed by one thread in that order: the result is the
// same for any thread count. The sum is the many-table backward's kernel
// (isa/embedding_bags_backward.cpp) on one table.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <tuple>
#include <vector>
#include "../checks.h"
#include "bags.h"
#include "bags_training.h"
#include "huge_pages.h"
#include "row_order.h"

namespace qembed {
namespace {

std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    const c10::optional<at::Tensor>& psw_in, int64_t mode, bool include_last_offset,
    int64_t padding_idx) {
  check_backward_args(grad_out_in, indices_in, offsets_in, psw_in, mode, include_last_offset);
  const at::Tensor grad_out = grad_out_in.to(at::kFloat).contiguous();
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t n = indices.numel(), dim = grad_out.size(1);

  at::Tensor psw_t;
  if (psw_in.has_value()) psw_t = psw_in->to(at::kFloat).contiguous();
  const float* psw = psw_t.defined() ? psw_t.data_ptr<float>() : nullptr;

  // bag[p] and the factor each position's gradient is scaled by.
  std::vector<int64_t> bag;
  if (mode == POOL_NONE) {
    bag.resize(n);
    for (int64_t p = 0; p < n; ++p) bag[p] = p;
  } else {
    const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
    const int64_t num_bags = grad_out.size(0);
    bag = bag_of_positions(bag_bounds(offsets.data_ptr<int64_t>(), offsets.numel(), num_bags, n));
  }
  const int64_t used = static_cast<int64_t>(bag.size());
  const int64_t* idx = indices.data_ptr<int64_t>();
  std::vector<float> factor(used, 1.0f);
  if (psw) {
    for (int64_t p = 0; p < used; ++p) factor[p] = psw[p];
  } else if (mode == POOL_MEAN) {
    std::vector<int64_t> count(grad_out.size(0), 0);
    for (int64_t p = 0; p < used; ++p) count[bag[p]] += idx[p] != padding_idx;
    for (int64_t p = 0; p < used; ++p)
      factor[p] = 1.0f / static_cast<float>(std::max<int64_t>(count[bag[p]], 1));
  }

  // Each position's gradient (its bag's row of grad_out, times its factor) in row order,
  // padding_idx's positions left out, cut into runs of one row: the many-table backward's
  // runs (bags_training.h) of one table. Sized for every position and cut to what is used:
  // push_back's size updates in this loop of random reads made it several times slower.
  const SortedPositions sorted = sorted_positions(idx, used);
  RowRuns runs;
  std::vector<int64_t>& offset = runs.offset.emplace_back(used);
  std::vector<float>& position_factor = runs.factor.emplace_back(used);
  std::vector<int64_t>& starts = runs.starts.emplace_back(used);
  std::vector<int64_t>& rows = runs.rows.emplace_back(used);
  int64_t num_kept = 0, num_unique = 0;
  for (int64_t j = 0; j < used; ++j) {
    const int64_t row = sorted.key[j], p = sorted.pos[j];
    if (row == padding_idx) continue;
    if (num_unique == 0 || row != rows[num_unique - 1]) {
      starts[num_unique] = num_kept;
      rows[num_unique++] = row;
    }
    offset[num_kept] = bag[p] * dim;
    position_factor[num_kept++] = factor[p];
  }
  offset.resize(num_kept);
  position_factor.resize(num_kept);
  starts.resize(num_unique);
  rows.resize(num_unique);
  runs.index();

  at::Tensor unique_rows = at::empty({num_unique}, indices.options());
  std::copy(rows.begin(), rows.end(), unique_rows.data_ptr<int64_t>());
  at::Tensor grad_rows = empty_on_huge_pages({num_unique, dim}, grad_out.options());
  float* grad_rows_ptr = grad_rows.data_ptr<float>();
  const BagsBackwardArgs args =
      runs.args(grad_out, c10::IntArrayRef(&dim, 1), &grad_rows_ptr);
  // Runs dealt out by count: split by positions (parallel_over_runs) was no faster on Zipf
  // ids and cost 0.2 ms more on uniform ones (2048 x 32 ids, two threads).
  at::parallel_for(0, num_unique, 64, [&](int64_t begin, int64_t end) {
    QEMBED_CPU_KERNEL(embedding_bags_backward_rows)(args, begin, end);
  });
  return {unique_rows, grad_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) {
  m.impl("embedding_bag_backward", &embedding_bag_backward_cpu);
}

}  // namespace qembed
