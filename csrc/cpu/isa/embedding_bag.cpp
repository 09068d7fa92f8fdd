// embedding_bag's kernels: fused gather-dequantize-pool over packed rows, for one instruction
// set (compiled once per variant, dispatch.h). Rows are read once, decoded in registers and
// accumulated in fp32; the rows of upcoming indices are prefetched because a lookup into a
// large table waits on memory, not on math.
#include "embedding_bag.h"
#include "../../layout.h"
#include "../pool_bag.h"

namespace qembed {
QEMBED_ISA_BEGIN
namespace {

template <int BITS, int64_t FMT, OutputType OUT, typename index_t>
bool pool_bags(const LookupArgs& a, const index_t* idx, int64_t begin, int64_t end, float* acc) {
  const int64_t dim = a.dim, last = a.starts[end];
  bool valid = true;
  for (int64_t b = begin; b < end; ++b) {
    const BagSum bag = pool_bag<BITS, FMT>(a.table, a.num_rows, a.stride, idx, a.starts[b],
                                           a.starts[b + 1], last, a.per_sample_weights, dim,
                                           a.table_step, a.padding_idx, acc);
    valid = valid && !bag.bad_index;
    const float factor = (a.mean && bag.count > 0) ? 1.0f / static_cast<float>(bag.count) : 1.0f;
    store_row<OUT>(acc, bag.shift, dim, factor, a.out, b * dim);
  }
  return valid;
}

// Like the pooled lookup, it checks each index as it reads it (an out-of-range one leaves its
// output row as zeros).
template <int BITS, OutputType OUT, typename index_t>
bool lookup_rows(const LookupArgs& a, const index_t* idx, int64_t begin, int64_t end,
                 float* value) {
  const int64_t dim = a.dim, stride = a.stride;
  const RowPrefetch prefetch(stride);
  bool valid = true;
  for (int64_t p = begin; p < end; ++p) {
    if (p + kPrefetchDistance < end)  // a wild index only prefetches, never faults
      prefetch(a.table + static_cast<int64_t>(idx[p + kPrefetchDistance]) * stride);
    for (int64_t d = 0; d < dim; ++d) value[d] = 0.0f;
    const int64_t r = idx[p];
    if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(a.num_rows)) {
      valid = false;
    } else if (r != a.padding_idx) {
      const uint8_t* row = a.table + r * stride;
      const RowParams prm = row_params(row, dim, BITS, a.fmt, a.table_step);
      accumulate_row<BITS>(row, dim, prm.scale, prm.bias, prm.offset, value);
    }
    const float w = a.per_sample_weights ? a.per_sample_weights[p] : 1.0f;
    for (int64_t d = 0; d < dim; ++d) store_output<OUT>(a.out, p * dim + d, value[d] * w);
  }
  return valid;
}

}  // namespace

bool embedding_bag_pool(const LookupArgs& a, int64_t begin, int64_t end, float* scratch) {
  return with_indices(a.indices, a.int64_indices, [&](const auto* idx) {
    return with_output_type(a.out_type, [&](auto out) {
      constexpr OutputType OUT = decltype(out)::value;
      return QEMBED_DISPATCH_BITS(a.bits, [&] {
        if (a.fmt == SYM_ROW) return pool_bags<BITS, SYM_ROW, OUT>(a, idx, begin, end, scratch);
        if (a.fmt == SYM_TABLE)
          return pool_bags<BITS, SYM_TABLE, OUT>(a, idx, begin, end, scratch);
        return pool_bags<BITS, AFFINE, OUT>(a, idx, begin, end, scratch);
      });
    });
  });
}

bool embedding_bag_rows(const LookupArgs& a, int64_t begin, int64_t end, float* scratch) {
  return with_indices(a.indices, a.int64_indices, [&](const auto* idx) {
    return with_output_type(a.out_type, [&](auto out) {
      constexpr OutputType OUT = decltype(out)::value;
      return QEMBED_DISPATCH_BITS(
          a.bits, [&] { return lookup_rows<BITS, OUT>(a, idx, begin, end, scratch); });
    });
  });
}

QEMBED_ISA_END
}  // namespace qembed
