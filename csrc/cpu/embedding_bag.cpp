// embedding_bag: fused gather-dequantize-pool over packed rows.
// Rows are read once, decoded in registers and accumulated in fp32; the rows of upcoming
// indices are prefetched because a lookup into a large table waits on memory, not on math.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>
#include "../checks.h"
#include "../padded_rows.h"
#include "bags.h"
#include "pool_bag.h"
#include "row_codec.h"

namespace qembed {
namespace {

// Returns false if an index was out of range (its rows were skipped).
template <int BITS, int64_t FMT, typename index_t, typename out_t>
bool pool_bags(const uint8_t* table, int64_t num_rows, int64_t stride, const index_t* idx,
               const std::vector<int64_t>& starts, const float* psw, int64_t dim,
               float table_step, bool mean, int64_t padding_idx, out_t* out) {
  const int64_t num_bags = static_cast<int64_t>(starts.size()) - 1;
  const int64_t grain = std::max<int64_t>(1, 4096 / (1 + starts.back() / std::max<int64_t>(1, num_bags)));
  std::atomic<bool> all_valid{true};
  at::parallel_for(0, num_bags, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dim);
    const int64_t last = starts[end];
    bool valid = true;
    for (int64_t b = begin; b < end; ++b) {
      const BagSum bag = pool_bag<BITS, FMT>(table, num_rows, stride, idx, starts[b],
                                             starts[b + 1], last, psw, dim, table_step,
                                             padding_idx, acc.data());
      valid = valid && !bag.bad_index;
      const float factor = (mean && bag.count > 0) ? 1.0f / static_cast<float>(bag.count) : 1.0f;
      store_row(acc.data(), bag.shift, dim, factor, out + b * dim);
    }
    if (!valid) all_valid = false;
  });
  return all_valid;
}

// mode none: out[p] = psw_p * dequantize(row[idx[p]]), rounded exactly as dequantize does.
// Like the pooled lookup, it checks each index as it reads it; returns false if one was out
// of range (its output row is left as zeros).
template <int BITS, typename index_t, typename out_t>
bool lookup_rows(const uint8_t* table, int64_t num_rows, int64_t stride, const index_t* idx,
                 int64_t n, const float* psw, int64_t dim, int64_t fmt, float table_step,
                 int64_t padding_idx, out_t* out) {
  std::atomic<bool> all_valid{true};
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> value(dim);
    const RowPrefetch prefetch(stride);
    bool valid = true;
    for (int64_t p = begin; p < end; ++p) {
      if (p + kPrefetchDistance < end)  // a wild index only prefetches, never faults
        prefetch(table + static_cast<int64_t>(idx[p + kPrefetchDistance]) * stride);
      std::fill(value.begin(), value.end(), 0.0f);
      const int64_t r = idx[p];
      if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(num_rows)) {
        valid = false;
      } else if (r != padding_idx) {
        const uint8_t* row = table + r * stride;
        const RowParams prm = row_params(row, dim, BITS, fmt, table_step);
        accumulate_row<BITS>(row, dim, prm.scale, prm.bias, prm.offset, value.data());
      }
      const float w = psw ? psw[p] : 1.0f;
      for (int64_t d = 0; d < dim; ++d) out[p * dim + d] = static_cast<out_t>(value[d] * w);
    }
    if (!valid) all_valid = false;
  });
  return all_valid;
}

at::Tensor embedding_bag_cpu(const at::Tensor& rows_in, const at::Tensor& indices_in,
                             const at::Tensor& offsets_in,
                             const c10::optional<at::Tensor>& psw_in,
                             const c10::optional<at::Tensor>& step, int64_t bits,
                             int64_t true_dim, int64_t fmt, int64_t mode,
                             bool include_last_offset, int64_t padding_idx,
                             at::ScalarType out_dtype) {
  const int64_t num_out = check_lookup_args(rows_in, indices_in, offsets_in, psw_in, step, bits,
                                            true_dim, fmt, mode, include_last_offset, out_dtype);
  const int64_t dim = padded_dim(true_dim);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = indices.numel(), num_rows = rows.size(0), stride = rows.size(1);
  const float table_step = fmt == SYM_TABLE ? step->item<float>() : 0.0f;
  at::Tensor psw_t;
  if (psw_in.has_value()) psw_t = psw_in->to(at::kFloat).contiguous();
  const float* psw = psw_t.defined() ? psw_t.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({num_out, dim}, rows.options().dtype(out_dtype));

  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "qembed_embedding_bag", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    std::vector<int64_t> starts;
    if (mode != POOL_NONE) {
      const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
      starts = bag_bounds(offsets.data_ptr<int64_t>(), offsets.numel(), num_out, n);
    }
    auto run = [&](auto* dst) {
      return QEMBED_DISPATCH_BITS(bits, [&] {
        if (mode != POOL_NONE) {
          auto pool = [&](auto fmt_constant) {
            return pool_bags<BITS, decltype(fmt_constant)::value>(
                rows.data_ptr<uint8_t>(), num_rows, stride, idx, starts, psw, dim, table_step,
                mode == POOL_MEAN, padding_idx, dst);
          };
          if (fmt == SYM_ROW) return pool(std::integral_constant<int64_t, SYM_ROW>());
          if (fmt == SYM_TABLE) return pool(std::integral_constant<int64_t, SYM_TABLE>());
          return pool(std::integral_constant<int64_t, AFFINE>());
        }
        return lookup_rows<BITS>(rows.data_ptr<uint8_t>(), num_rows, stride, idx, n, psw, dim,
                                 fmt, table_step, padding_idx, dst);
      });
    };
    bool valid;
    if (out_dtype == at::kFloat) valid = run(out.data_ptr<float>());
    else if (out_dtype == at::kHalf) valid = run(out.data_ptr<at::Half>());
    else valid = run(out.data_ptr<at::BFloat16>());
    // Positions after the last bag are not read, but are checked all the same.
    for (int64_t p = starts.empty() ? n : starts.back(); p < n && valid; ++p)
      valid = idx[p] >= 0 && idx[p] < num_rows;
    // The lookup skipped the bad rows; find the first one for the message.
    if (!valid) check_indices_in_range(idx, n, num_rows);
  });
  return narrow_columns(out, true_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("embedding_bag", &embedding_bag_cpu); }

}  // namespace qembed
