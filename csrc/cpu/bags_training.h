// What the many-table training ops share (embedding_bags_backward, embedding_bags_update and
// embedding_bags_backward_update, which is the two in one pass):
// - RowRuns: a batch's positions ordered by row per table, cut into runs of one row, as
//   where each position's gradient is in grad_out and its factor; one (table, run) is one
//   work item, and a run's gradient is summed in position order (run_gradient.h);
// - TableUpdates: the per-table update arguments, and the end of an update (skipped rows
//   counted, a learnt per-table step moved and its rows re-quantized).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <algorithm>
#include <vector>
#include "../checks.h"
#include "../optim.h"
#include "isa/embedding_bags_backward.h"
#include "isa/embedding_bags_update.h"
#include "isa/lowp_update.h"
#include "row_order.h"

namespace qembed {

struct RowRuns {
  // Per table, in row order (repeats in position order): each position's gradient, as the
  // offset of its row in grad_out (its bag's row, its feature's first column) and the factor
  // it is scaled by (the weight, 1 / bag length for mean, or 1); the start of each run; the
  // distinct rows (one per run, ascending). The kernels then read these in order, and only
  // the gradient rows at random.
  std::vector<std::vector<int64_t>> offset, starts, rows;
  std::vector<std::vector<float>> factor;
  std::vector<int64_t> item_start;  // [T + 1]: table t's first work item
  // The pointer arrays of the kernels' arguments.
  std::vector<const int64_t*> offset_ptr, starts_ptr, rows_ptr;
  std::vector<const float*> factor_ptr;
  std::vector<int64_t> num_positions, num_rows;

  int64_t num_items() const { return item_start.back(); }

  // Sets item_start, the pointer arrays and the counts once each table's offset, factor,
  // starts and rows are filled.
  void index() {
    const int64_t num_tables = static_cast<int64_t>(offset.size());
    item_start.assign(num_tables + 1, 0);
    for (int64_t t = 0; t < num_tables; ++t) {
      item_start[t + 1] = item_start[t] + static_cast<int64_t>(rows[t].size());
      offset_ptr.push_back(offset[t].data());
      factor_ptr.push_back(factor[t].data());
      starts_ptr.push_back(starts[t].data());
      rows_ptr.push_back(rows[t].data());
      num_positions.push_back(static_cast<int64_t>(offset[t].size()));
      num_rows.push_back(static_cast<int64_t>(rows[t].size()));
    }
  }

  // The kernels' arguments (grad_out: fp32, contiguous); grad_rows (one pointer per table)
  // is null where the kernel sums into scratch.
  BagsBackwardArgs args(const at::Tensor& grad_out, c10::IntArrayRef dims,
                        float* const* grad_rows) const {
    return {grad_out.data_ptr<float>(), static_cast<int64_t>(offset.size()),
            item_start.data(),          dims.data(),
            offset_ptr.data(),          factor_ptr.data(),
            starts_ptr.data(),          num_positions.data(),
            grad_rows,                  grad_out.nbytes() > kCachedGradOutBytes};
  }
};

// The runs of a batch whose arguments `op` has checked (check_bags_backward_args): values,
// offsets and weights as the ops take them, shape.batch_size bags per feature, an output
// gradient shape.width wide. The offsets are checked here, and with num_rows (each table's
// rows) the ids too. The runs keep no pointer into the tensors.
inline RowRuns row_runs(const char* op, int64_t num_tables, const BagsShape& shape,
                        c10::IntArrayRef feature_tables, c10::IntArrayRef feature_columns,
                        c10::IntArrayRef poolings, const at::Tensor& values_in,
                        const at::Tensor& offsets_in, const c10::optional<at::Tensor>& psw_in,
                        const std::vector<int64_t>* num_rows = nullptr) {
  const int64_t batch = shape.batch_size, width = shape.width;
  const at::Tensor values = values_in.to(at::kLong).contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t* idx = values.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_bags_offsets_values(op, off, offsets.numel(), std::max<int64_t>(batch, 1),
                            values.numel());
  if (num_rows) check_bags_ids_values(op, idx, off, batch, feature_tables, *num_rows);
  at::Tensor psw_t;
  if (psw_in.has_value()) psw_t = psw_in->to(at::kFloat).contiguous();
  const float* psw = psw_t.defined() ? psw_t.data_ptr<float>() : nullptr;
  const int64_t num_features = static_cast<int64_t>(feature_tables.size());
  RowRuns r;
  r.offset.resize(num_tables);
  r.factor.resize(num_tables);
  r.starts.resize(num_tables);
  r.rows.resize(num_tables);
  at::parallel_for(0, num_tables, 1, [&](int64_t begin, int64_t end) {
    // Buffers kept over the thread's tables. Each table's positions, in the order of values,
    // are sorted as words (id << pos_bits | position), the position's gradient offset and
    // factor looked up by position afterwards; ids too wide for that go to sorted_positions.
    std::vector<uint64_t> words;
    std::vector<int64_t> offset, count(kSortRadix + 1);
    std::vector<float> factor;
    for (int64_t t = begin; t < end; ++t) {
      int64_t n = 0;
      uint64_t all_ids = 0;  // or-ed: its width is the largest id's, its sign any id's
      for (int64_t f = 0; f < num_features; ++f) {
        if (feature_tables[f] != t) continue;
        n += off[(f + 1) * batch] - off[f * batch];
        if (!num_rows)
          for (int64_t p = off[f * batch]; p < off[(f + 1) * batch]; ++p)
            all_ids |= static_cast<uint64_t>(idx[p]);
      }
      if (num_rows) all_ids = static_cast<uint64_t>(std::max<int64_t>((*num_rows)[t] - 1, 0));
      const int pos_bits = bit_width(static_cast<uint64_t>(n > 1 ? n - 1 : 1));
      const int key_bits = bit_width(all_ids);
      const bool as_words = key_bits + pos_bits <= 64;  // false for a negative id too
      words.resize(as_words ? 2 * n : n);
      offset.resize(n);
      factor.resize(n);
      int64_t i = 0;
      for (int64_t f = 0; f < num_features; ++f) {
        if (feature_tables[f] != t) continue;
        const bool mean = poolings[f] == POOL_MEAN;
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t k = f * batch + b, first = off[k], last = off[k + 1];
          const int64_t column = b * width + feature_columns[f];
          const float bag_factor =
              mean ? 1.0f / static_cast<float>(std::max<int64_t>(last - first, 1)) : 1.0f;
          for (int64_t p = first; p < last; ++p, ++i) {
            const uint64_t id = static_cast<uint64_t>(idx[p]);
            words[i] = as_words ? id << pos_bits | static_cast<uint64_t>(i) : id;
            offset[i] = column;
            factor[i] = psw ? psw[p] : bag_factor;
          }
        }
      }
      r.offset[t].resize(n);
      r.factor[t].resize(n);
      r.starts[t].resize(n);
      r.rows[t].resize(n);
      int64_t* position_offset = r.offset[t].data();
      float* position_factor = r.factor[t].data();
      int64_t* starts = r.starts[t].data();
      int64_t* rows = r.rows[t].data();
      int64_t runs = 0;
      // The j-th position in row order: its row and its index in values' order.
      auto emit = [&](int64_t j, int64_t row, int64_t p) {
        position_offset[j] = offset[p];
        position_factor[j] = factor[p];
        if (j == 0 || row != rows[runs - 1]) {
          starts[runs] = j;
          rows[runs++] = row;
        }
      };
      if (as_words) {
        const uint64_t* sorted = QEMBED_CPU_KERNEL(sort_words)(
            words.data(), words.data() + n, n, pos_bits, key_bits, count.data());
        const uint64_t pos_mask = (uint64_t{1} << pos_bits) - 1;
        for (int64_t j = 0; j < n; ++j)
          emit(j, static_cast<int64_t>(sorted[j] >> pos_bits),
               static_cast<int64_t>(sorted[j] & pos_mask));
      } else {
        const SortedPositions sorted =
            sorted_positions(reinterpret_cast<const int64_t*>(words.data()), n);
        for (int64_t j = 0; j < n; ++j) emit(j, sorted.key[j], sorted.pos[j]);
      }
      r.starts[t].resize(runs);
      r.rows[t].resize(runs);
    }
  });
  r.index();
  return r;
}

// Work items [0, num_items) split into `parts` ranges of about equal work, a run costing its
// positions plus `run_cost`: at::parallel_for's equal counts of items would give one thread
// all the runs of a small table, thousands of positions each. Returns the parts + 1 bounds.
inline std::vector<int64_t> balanced_bounds(const RowRuns& r, int64_t parts, int64_t run_cost) {
  const int64_t num_tables = static_cast<int64_t>(r.offset.size());
  std::vector<int64_t> work(r.num_items() + 1, 0);  // work before item i
  int64_t i = 0;
  for (int64_t t = 0; t < num_tables; ++t) {
    const int64_t runs = r.num_rows[t];
    for (int64_t k = 0; k < runs; ++k, ++i) {
      const int64_t end = k + 1 < runs ? r.starts[t][k + 1] : r.num_positions[t];
      work[i + 1] = work[i] + end - r.starts[t][k] + run_cost;
    }
  }
  std::vector<int64_t> bounds(parts + 1, r.num_items());
  bounds[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = work.back() * p / parts;
    bounds[p] = std::lower_bound(work.begin(), work.end(), target) - work.begin();
  }
  return bounds;
}

// Calls fn(begin, end) on each of balanced_bounds' ranges, one per thread.
template <typename F>
void parallel_over_runs(const RowRuns& r, int64_t run_cost, const F& fn) {
  const std::vector<int64_t> bounds = balanced_bounds(r, at::get_num_threads(), run_cost);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t b, int64_t e) {
    for (int64_t part = b; part < e; ++part)
      if (bounds[part] < bounds[part + 1]) fn(bounds[part], bounds[part + 1]);
  });
}

// The update of every table's distinct rows rows[t][0, counts[t]) with gradients grads[t]
// ([U_t, padded dim], or null where the kernel sums them itself), as embedding_bags_update
// takes its arguments (checked).
struct TableUpdates {
  std::vector<UpdateArgs> work;
  // A table's second-pass buffers (a learnt per-table step): the rows' updated values
  // [U, padded D] and LSQ sums; and every table's skipped rows.
  std::vector<std::vector<float>> kept, lsq;
  std::vector<std::vector<uint8_t>> skipped;
  std::vector<int64_t> item_start;
  int64_t max_dim = 0;  // the largest padded dim

  BagsUpdateArgs args() const { return {work.data(), item_start.data()}; }
};

inline TableUpdates table_updates(at::TensorList tables, at::TensorList steps,
                                  at::TensorList states, at::TensorList step_states,
                                  const std::vector<const int64_t*>& rows,
                                  const std::vector<int64_t>& counts,
                                  const std::vector<const float*>& grads, c10::IntArrayRef bits,
                                  c10::IntArrayRef dims, c10::IntArrayRef formats,
                                  int64_t optimizer, double lr, double eps, double weight_decay,
                                  double beta1, double beta2, bool learn_step,
                                  int64_t step_optimizer, double step_lr, bool stochastic,
                                  c10::IntArrayRef seeds, c10::IntArrayRef counters,
                                  at::OptionalIntArrayRef row_offsets,
                                  at::OptionalIntArrayRef column_offsets) {
  const size_t num_tables = tables.size();
  TableUpdates u;
  u.work.resize(num_tables);
  u.kept.resize(num_tables);
  u.lsq.resize(num_tables);
  u.skipped.resize(num_tables);
  u.item_start.assign(num_tables + 1, 0);
  for (size_t t = 0; t < num_tables; ++t) {
    const int64_t count = counts[t];
    const bool deferred = learn_step && formats[t] == SYM_TABLE;
    if (deferred) {
      u.kept[t].resize(count * padded_dim(dims[t]));
      u.lsq[t].resize(count);
    }
    u.skipped[t].assign(count, 0);
    u.work[t] = {{tables[t].data_ptr<uint8_t>(), tables[t].size(1),
                  formats[t] == SYM_TABLE ? steps[t].data_ptr<float>() : nullptr,
                  states[t].data_ptr<float>(), step_states[t].data_ptr<float>()},
                 bits[t], rows[t], count, grads[t], nullptr,
                 deferred ? u.kept[t].data() : nullptr, false,
                 deferred ? u.lsq[t].data() : nullptr, u.skipped[t].data(),
                 make_update_config(dims[t], formats[t], optimizer, lr, eps, weight_decay, beta1,
                                    beta2, counters[t], learn_step, step_optimizer, step_lr),
                 {stochastic, static_cast<uint64_t>(seeds[t]),
                  static_cast<uint64_t>(counters[t]), 0,
                  static_cast<uint64_t>(key_offset(row_offsets, t)),
                  key_offset(column_offsets, t)}};
    u.item_start[t + 1] = u.item_start[t] + count;
    u.max_dim = std::max(u.max_dim, padded_dim(dims[t]));
  }
  return u;
}

// After every row's update: the rows skipped per table (int64 [T], the op's result), and
// the tables with a learnt per-table step moved and re-quantized.
inline at::Tensor finish_updates(const TableUpdates& u) {
  const int64_t num_tables = static_cast<int64_t>(u.work.size());
  at::Tensor num_skipped = at::zeros({num_tables}, at::TensorOptions().dtype(at::kLong));
  int64_t* counts = num_skipped.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tables; ++t) {
    const UpdateArgs& w = u.work[t];
    for (uint8_t x : u.skipped[t]) counts[t] += x;
    if (w.lsq && counts[t] < w.num_unique) {
      const float s = QEMBED_CPU_KERNEL(lowp_update_table_step)(w, counts[t]);
      at::parallel_for(0, w.num_unique, 16, [&](int64_t begin, int64_t end) {
        QEMBED_CPU_KERNEL(lowp_update_encode)(w, begin, end, s);
      });
    }
  }
  return num_skipped;
}

}  // namespace qembed
