// embedding_bags' kernel: the many-table lookup of a chunk of consecutive bags, for one
// instruction set (compiled once per variant, dispatch.h). Each feature is pooled as the
// single-table lookup pools it (pool_bag.h) and written straight into its block of the
// chunk's output rows.
#include "embedding_bags.h"
#include "../../layout.h"
#include "../pool_bag.h"

namespace qembed {
QEMBED_ISA_BEGIN
namespace {

// Prefetches the rows of the first kPrefetchDistance positions from p: pool_bag prefetches
// that far ahead of the row it reads, so these are the rows it would find missing.
template <typename index_t>
void prefetch_first_rows(const BagsTable& t, const index_t* idx, int64_t p, int64_t end) {
  const RowPrefetch prefetch(t.stride);
  for (int64_t q = p; q < std::min(p + kPrefetchDistance, end); ++q)
    prefetch(t.rows + static_cast<int64_t>(idx[q]) * t.stride);  // a wild index never faults
}

// Pools bags [b0, b1) of one feature (`off`: its B + 1 offsets) into its block of the output
// rows, from column `column`; returns false if an index was out of range (its rows were
// skipped).
template <int BITS, int64_t FMT, OutputType OUT, typename index_t>
bool pool_chunk(const BagsTable& t, const index_t* idx, const int64_t* off, int64_t b0,
                int64_t b1, const float* psw, bool mean, int64_t width, void* out,
                int64_t column, bool stream, float* acc) {
  const int64_t last = off[b1];
  bool valid = true;
  for (int64_t b = b0; b < b1; ++b) {
    const BagSum bag = pool_bag<BITS, FMT>(t.rows, t.num_rows, t.stride, idx, off[b],
                                           off[b + 1], last, psw, padded_dim(t.dim), t.step, -1,
                                           acc);
    valid = valid && !bag.bad_index;
    const float factor = (mean && bag.count > 0) ? 1.0f / static_cast<float>(bag.count) : 1.0f;
    if constexpr (OUT == OutputType::kFloat) {
      if (stream) {
        store_row_streaming(acc, bag.shift, t.dim, factor, static_cast<float*>(out),
                            b * width + column);
        continue;
      }
    }
    store_row<OUT>(acc, bag.shift, t.dim, factor, out, b * width + column);
  }
  return valid;
}

template <OutputType OUT, typename index_t>
bool pool_chunk_any(const BagsTable& t, const index_t* idx, const int64_t* off, int64_t b0,
                    int64_t b1, const float* psw, bool mean, int64_t width, void* out,
                    int64_t column, bool stream, float* acc) {
  return QEMBED_DISPATCH_BITS(t.bits, [&] {
    if (t.fmt == SYM_ROW)
      return pool_chunk<BITS, SYM_ROW, OUT>(t, idx, off, b0, b1, psw, mean, width, out, column,
                                            stream, acc);
    if (t.fmt == SYM_TABLE)
      return pool_chunk<BITS, SYM_TABLE, OUT>(t, idx, off, b0, b1, psw, mean, width, out,
                                              column, stream, acc);
    return pool_chunk<BITS, AFFINE, OUT>(t, idx, off, b0, b1, psw, mean, width, out, column,
                                         stream, acc);
  });
}

}  // namespace

bool embedding_bags_chunk(const BagsLookupArgs& a, int64_t first_bag, int64_t end_bag,
                          float* acc) {
  return with_indices(a.values, a.int64_values, [&](const auto* idx) {
    return with_output_type(a.out_type, [&](auto out_type) {
      constexpr OutputType OUT = decltype(out_type)::value;
      const int64_t batch = a.batch;
      auto first_rows = [&](int64_t f) {
        prefetch_first_rows(a.tables[a.feature_tables[f]], idx, a.offsets[f * batch + first_bag],
                            a.offsets[f * batch + end_bag]);
      };
      bool valid = true;
      if (a.num_features > 0) first_rows(0);
      for (int64_t f = 0; f < a.num_features; ++f) {
        if (f + 1 < a.num_features) first_rows(f + 1);
        valid = pool_chunk_any<OUT>(a.tables[a.feature_tables[f]], idx, a.offsets + f * batch,
                                    first_bag, end_bag, a.per_sample_weights,
                                    a.poolings[f] == POOL_MEAN, a.width, a.out,
                                    a.feature_columns[f], a.stream_output, acc) &&
                valid;
      }
      if (a.stream_output) stream_fence();
      return valid;
    });
  });
}

QEMBED_ISA_END
}  // namespace qembed
