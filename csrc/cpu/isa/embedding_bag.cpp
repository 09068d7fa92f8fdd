// embedding_bag's kernels: fused gather-dequantize-pool over packed rows, for one instruction
// set (compiled once per variant, dispatch.h). Rows are read once, decoded in registers and
// accumulated in fp32; the rows of upcoming indices are prefetched because a lookup into a
// large table waits on memory, not on math.
#include "embedding_bag.h"
#include <algorithm>
#include <type_traits>
#include "../../layout.h"
#include "../prefetch.h"
#include "../row_codec.h"

namespace qembed {
QEMBED_ISA_BEGIN
namespace {

// One bag's pooled row, before the per-bag constant `shift` and the mean's factor.
struct BagSum {
  float shift = 0.0f;  // sum of the rows' constant terms psw * (scale * offset + bias)
  int64_t count = 0;   // rows pooled (padding entries excluded)
  bool bad_index = false;  // an index out of range was met (and skipped)
};

// Adds the columns [d0, d0 + width) of the rows at positions [p0, p1) into `accum`; the
// FIRST block (d0 == 0) also prefetches and counts. Indices are range-checked here, as the
// rows are read, rather than in a separate pass over all of them. Width, format and FIRST
// are compile-time so that the row's parameters and the column offsets of its codes fold
// into constants: a per-row loop with them at run time spilled and reloaded them every row.
template <int BITS, int64_t FMT, bool FIRST, typename Acc, typename index_t>
inline void pool_block(Acc& accum, const LookupArgs& a, const index_t* idx, int64_t p0,
                              int64_t p1, int64_t last, int64_t d0, BagSum& bag) {
  const uint8_t* table = a.table;
  const int64_t stride = a.stride, num_rows = a.num_rows, padding_idx = a.padding_idx;
  const int64_t dim = a.dim;
  const float table_step = a.table_step;
  const float* psw = a.per_sample_weights;
  const RowPrefetch prefetch(stride);
  const int64_t col = FIRST ? 0 : d0 * BITS / 8;
  // Locals, not `bag`'s fields: through the reference each row would wait on the previous
  // row's store of the running sum.
  float shift = 0.0f;
  int64_t count = 0;
  bool bad_index = false;
  for (int64_t p = p0; p < p1; ++p) {
    // Rows prefetched kPrefetchDistance ahead, kPrefetchBurst at a time (prefetch.h);
    // unrolled but near the end. A wild index only prefetches, never faults.
    if (FIRST && (p & (kPrefetchBurst - 1)) == 0) {
      const int64_t q0 = p + kPrefetchDistance;
      if (q0 + kPrefetchBurst <= last) {
#pragma GCC unroll 8
        for (int64_t k = 0; k < kPrefetchBurst; ++k)
          prefetch(table + static_cast<int64_t>(idx[q0 + k]) * stride);
      } else {
        for (int64_t q = q0; q < last; ++q) prefetch(table + static_cast<int64_t>(idx[q]) * stride);
      }
    }
    const int64_t r = idx[p];
    if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(num_rows)) {
      bad_index = true;
      continue;
    }
    if (r == padding_idx) continue;
    const uint8_t* row = table + r * stride;
    const RowParams prm = row_params(row, dim, BITS, FMT, table_step);
    const float w = psw ? psw[p] : 1.0f;
    const float scale = w * prm.scale;
    accum.template add<BITS>(row + col, scale);
    if (FIRST) {
      shift += scale * static_cast<float>(prm.offset) + w * prm.bias;
      ++count;
    }
  }
  if (FIRST) {
    bag.shift = shift;
    bag.count = count;
    bag.bad_index = bad_index;
  }
}

// Pools positions [p0, p1) into acc[0, dim) (overwritten). Columns go in blocks of kLanes
// whose accumulators stay in registers; rows are re-read from cache for later blocks (D >
// kLanes only).
template <int BITS, int64_t FMT, typename index_t>
inline BagSum pool_bag(const LookupArgs& a, const index_t* idx, int64_t p0, int64_t p1,
                              int64_t last, float* acc) {
  BagSum bag;
  const int64_t dim = a.dim;
  with_accumulator(std::min<int64_t>(kLanes, dim), [&](auto&& accum) {
    pool_block<BITS, FMT, true>(accum, a, idx, p0, p1, last, 0, bag);
    accum.store(acc);
  });
  for (int64_t d0 = kLanes; d0 < dim; d0 += kLanes) {
    with_accumulator(std::min<int64_t>(kLanes, dim - d0), [&](auto&& accum) {
      pool_block<BITS, FMT, false>(accum, a, idx, p0, p1, last, d0, bag);
      accum.store(acc + d0);
    });
  }
  return bag;
}

template <int BITS, int64_t FMT, OutputType OUT, typename index_t>
bool pool_bags(const LookupArgs& a, const index_t* idx, int64_t begin, int64_t end, float* acc) {
  const int64_t dim = a.dim, last = a.starts[end];
  void* out = a.out;
  bool valid = true;
  for (int64_t b = begin; b < end; ++b) {
    const BagSum bag = pool_bag<BITS, FMT>(a, idx, a.starts[b], a.starts[b + 1], last, acc);
    valid = valid && !bag.bad_index;
    const float factor = (a.mean && bag.count > 0) ? 1.0f / static_cast<float>(bag.count) : 1.0f;
    for (int64_t d = 0; d < dim; ++d)
      store_output<OUT>(out, b * dim + d, (acc[d] + bag.shift) * factor);
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

// Calls f(idx) with the indices in their own type.
template <typename F>
bool with_indices(const LookupArgs& a, F&& f) {
  if (a.int64_indices) return f(static_cast<const int64_t*>(a.indices));
  return f(static_cast<const int32_t*>(a.indices));
}

}  // namespace

bool embedding_bag_pool(const LookupArgs& a, int64_t begin, int64_t end, float* scratch) {
  return with_indices(a, [&](const auto* idx) {
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
  return with_indices(a, [&](const auto* idx) {
    return with_output_type(a.out_type, [&](auto out) {
      constexpr OutputType OUT = decltype(out)::value;
      return QEMBED_DISPATCH_BITS(
          a.bits, [&] { return lookup_rows<BITS, OUT>(a, idx, begin, end, scratch); });
    });
  });
}

QEMBED_ISA_END
}  // namespace qembed
