// Pooling one bag of packed rows into fp32 accumulators: what the single-table lookup
// (isa/embedding_bag.cpp) and the many-table one (isa/embedding_bags.cpp) share.
#pragma once
#include <algorithm>
#include <cstdint>
#include "output.h"
#include "prefetch.h"
#include "row_codec.h"

namespace qembed {
QEMBED_ISA_BEGIN

// out[first + d] = (acc[d] + shift) * factor for d in [0, dim), in the output's type.
template <OutputType OUT>
inline void store_row(const float* acc, float shift, int64_t dim, float factor, void* out,
                      int64_t first) {
  for (int64_t d = 0; d < dim; ++d) store_output<OUT>(out, first + d, (acc[d] + shift) * factor);
}

// store_row for fp32 with streaming stores, which write whole cache lines without reading
// them first: an output of tens of MB (one id per bag) is otherwise read from memory line by
// line before each is written, which doubled the one-id lookup's time. `out + first` must be
// 32-byte aligned and dim a multiple of 8; the caller fences (stream_fence) before the
// output is read. Without AVX2, store_row.
inline void store_row_streaming(const float* acc, float shift, int64_t dim, float factor,
                                float* out, int64_t first) {
#if defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(shift), f = _mm256_set1_ps(factor);
  for (int64_t d = 0; d < dim; d += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(acc + d), s), f);
    _mm256_stream_ps(out + first + d, v);
  }
#else
  store_row<OutputType::kFloat>(acc, shift, dim, factor, out, first);
#endif
}

// Orders the streaming stores before the stores that follow (and so before another thread
// reads the output).
inline void stream_fence() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

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
inline void pool_block(Acc& accum, const uint8_t* table, int64_t num_rows, int64_t stride,
                       const index_t* idx, int64_t p0, int64_t p1, int64_t last,
                       const float* psw, int64_t dim, float table_step, int64_t padding_idx,
                       int64_t d0, BagSum& bag) {
  const RowPrefetch prefetch(stride);
  const int64_t col = FIRST ? 0 : d0 * BITS / 8;
  // Locals, not `bag`'s fields: through the reference each row would wait on the previous
  // row's store of the running sum.
  float shift = 0.0f;
  int64_t count = 0;
  bool bad_index = false;
  for (int64_t p = p0; p < p1; ++p) {
    // Rows prefetched kPrefetchDistance ahead, kPrefetchBurst at a time (prefetch.h); unrolled
    // but near the end. A wild index only prefetches, never faults.
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
    const float a = w * prm.scale;
    accum.template add<BITS>(row + col, a);
    if (FIRST) {
      shift += a * static_cast<float>(prm.offset) + w * prm.bias;
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
inline BagSum pool_bag(const uint8_t* table, int64_t num_rows, int64_t stride,
                       const index_t* idx, int64_t p0, int64_t p1, int64_t last,
                       const float* psw, int64_t dim, float table_step, int64_t padding_idx,
                       float* acc) {
  BagSum bag;
  with_accumulator(std::min<int64_t>(kLanes, dim), [&](auto&& accum) {
    pool_block<BITS, FMT, true>(accum, table, num_rows, stride, idx, p0, p1, last, psw, dim,
                                table_step, padding_idx, 0, bag);
    accum.store(acc);
  });
  for (int64_t d0 = kLanes; d0 < dim; d0 += kLanes) {
    with_accumulator(std::min<int64_t>(kLanes, dim - d0), [&](auto&& accum) {
      pool_block<BITS, FMT, false>(accum, table, num_rows, stride, idx, p0, p1, last, psw, dim,
                                   table_step, padding_idx, d0, bag);
      accum.store(acc + d0);
    });
  }
  return bag;
}

// Calls f(idx) with the indices in their own type.
template <typename F>
inline auto with_indices(const void* indices, bool int64_indices, F&& f) {
  if (int64_indices) return f(static_cast<const int64_t*>(indices));
  return f(static_cast<const int32_t*>(indices));
}

QEMBED_ISA_END
}  // namespace qembed
