// embedding_bags_backward: the gradient of the many-table lookup with respect to the rows it
// read, per table, one row per distinct index (never a dense [R, D] gradient). A table's
// positions are those of all its features, in the order of values; they are ordered by row
// with a stable sort, so repeats keep that order, and each distinct row is summed by one
// thread in it: the result is the same for any thread count, and a table read by one
// feature gets the bits embedding_bag_backward gives it. The kernel
// (isa/embedding_bags_backward.cpp) sums.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <tuple>
#include <vector>
#include "../checks.h"
#include "huge_pages.h"
#include "isa/embedding_bags_backward.h"
#include "row_order.h"

namespace qembed {
namespace {

// One table's sorted positions: pos[j] (global positions) ordered by row, and the starts
// of the runs of equal rows.
struct TableRuns {
  std::vector<int64_t> pos, key, starts;
};

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> embedding_bags_backward_cpu(
    const at::Tensor& grad_out_in, c10::IntArrayRef dims, c10::IntArrayRef feature_tables,
    c10::IntArrayRef feature_columns, c10::IntArrayRef poolings, const at::Tensor& values_in,
    const at::Tensor& offsets_in, const c10::optional<at::Tensor>& psw_in) {
  const char* op = "qembed.embedding_bags_backward: ";
  const BagsShape shape = check_bags_backward_args(grad_out_in, dims, feature_tables,
                                                   feature_columns, poolings, values_in,
                                                   offsets_in, psw_in);
  const int64_t batch = shape.batch_size, width = shape.width;
  const int64_t num_tables = static_cast<int64_t>(dims.size());
  const int64_t num_features = static_cast<int64_t>(feature_tables.size());
  const at::Tensor grad_out = grad_out_in.to(at::kFloat).contiguous();
  const at::Tensor values = values_in.to(at::kLong).contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t* idx = values.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t n = values.numel();
  check_bags_offsets_values(op, off, offsets.numel(), std::max<int64_t>(batch, 1), n);
  at::Tensor psw_t;
  if (psw_in.has_value()) psw_t = psw_in->to(at::kFloat).contiguous();
  const float* psw = psw_t.defined() ? psw_t.data_ptr<float>() : nullptr;

  // Each position's bag (row of grad_out) and the factor its gradient is scaled by: the
  // weight, 1 / bag length for mean, or 1.
  std::vector<int64_t> bag(n);
  std::vector<float> factor(n, 1.0f);
  for (int64_t k = 0; k < num_features * batch; ++k) {
    const bool mean = poolings[k / batch] == POOL_MEAN;
    const float f = 1.0f / static_cast<float>(std::max<int64_t>(off[k + 1] - off[k], 1));
    for (int64_t p = off[k]; p < off[k + 1]; ++p) {
      bag[p] = k % batch;
      factor[p] = psw ? psw[p] : (mean ? f : 1.0f);
    }
  }

  std::vector<TableRuns> runs(num_tables);
  at::parallel_for(0, num_tables, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      TableRuns& r = runs[t];
      for (int64_t f = 0; f < num_features; ++f)
        if (feature_tables[f] == t)
          for (int64_t p = off[f * batch]; p < off[(f + 1) * batch]; ++p) r.pos.push_back(p);
      std::vector<int64_t> key(r.pos.size());
      for (size_t j = 0; j < key.size(); ++j) key[j] = idx[r.pos[j]];
      SortedPositions sorted = sorted_positions(key.data(), static_cast<int64_t>(key.size()));
      for (size_t j = 0; j < key.size(); ++j) {
        sorted.pos[j] = r.pos[sorted.pos[j]];
        if (j == 0 || sorted.key[j] != sorted.key[j - 1])
          r.starts.push_back(static_cast<int64_t>(j));
      }
      r.pos.swap(sorted.pos);
      r.key.swap(sorted.key);
    }
  });

  // Every (table, distinct row) is a work item; item_start[t] is table t's first.
  std::vector<int64_t> item_start(num_tables + 1, 0);
  std::vector<at::Tensor> unique_rows, grad_rows;
  for (int64_t t = 0; t < num_tables; ++t) {
    const int64_t u = static_cast<int64_t>(runs[t].starts.size());
    item_start[t + 1] = item_start[t] + u;
    unique_rows.push_back(at::empty({u}, values.options()));
    grad_rows.push_back(empty_on_huge_pages({u, dims[t]}, grad_out.options()));
  }
  // The feature of each position, for its columns in grad_out.
  std::vector<int64_t> column(n);
  for (int64_t f = 0; f < num_features; ++f)
    for (int64_t p = off[f * batch]; p < off[(f + 1) * batch]; ++p) column[p] = feature_columns[f];
  std::vector<const int64_t*> pos, key, starts;
  std::vector<int64_t> num_positions;
  std::vector<int64_t*> uniq;
  std::vector<float*> out;
  for (int64_t t = 0; t < num_tables; ++t) {
    pos.push_back(runs[t].pos.data());
    key.push_back(runs[t].key.data());
    starts.push_back(runs[t].starts.data());
    num_positions.push_back(static_cast<int64_t>(runs[t].key.size()));
    uniq.push_back(unique_rows[t].data_ptr<int64_t>());
    out.push_back(grad_rows[t].data_ptr<float>());
  }
  const BagsBackwardArgs args{grad_out.data_ptr<float>(), width, num_tables, item_start.data(),
                              dims.data(), pos.data(), key.data(), starts.data(),
                              num_positions.data(), bag.data(), column.data(), factor.data(),
                              uniq.data(), out.data()};
  at::parallel_for(0, item_start[num_tables], 64, [&](int64_t begin, int64_t end) {
    QEMBED_CPU_KERNEL(embedding_bags_backward_rows)(args, begin, end);
  });
  return {unique_rows, grad_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) {
  m.impl("embedding_bags_backward", &embedding_bags_backward_cpu);
}

}  // namespace qembed
