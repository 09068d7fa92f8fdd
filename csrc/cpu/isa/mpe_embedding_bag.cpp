// mpe_embedding_bag's kernel: one lookup over a mixed-width table, for one instruction set
// (compiled once per variant, dispatch.h). A stored row reads as alpha_s * q + beta, a pruned
// row as zeros (it still counts in a mean). Rows of any width mix freely within a bag.
#include "mpe_embedding_bag.h"
#include <algorithm>
#include "../../layout.h"
#include "../prefetch.h"
#include "../row_codec.h"

namespace qembed {
QEMBED_ISA_BEGIN
namespace {

// A row as the lookup needs it, 16 bytes (the pipeline keeps a ring of them): its codes, step
// and width; width 0 for a pruned row (no codes), -1 for an index or location out of range,
// which the lookup skips.
struct RowRef {
  const uint8_t* codes;
  float step;
  int16_t bits;
  int16_t lines;  // 64-byte cache lines the row touches (0 without codes)
};
constexpr RowRef kInvalidRow{nullptr, 0.0f, -1, 0};
constexpr RowRef kPrunedRow{nullptr, 0.0f, 0, 0};

QEMBED_INLINE RowRef stored_row(const uint8_t* codes, float step, int64_t bits, int64_t stride) {
  return {codes, step, static_cast<int16_t>(bits),
          static_cast<int16_t>(lines_touched(codes, stride))};
}

// Rows found through a row map (int16 for tables under 2^15 rows, else int32): one more
// random read per row. Rows are prefetched kLookahead positions ahead of their use: with
// the single-width distance (32) the lookup took ~1.3x as long per line fetched (AVX-512
// Xeon).
template <typename map_t>
struct MapTable {
  static constexpr int64_t kLookahead = kPrefetchDistance / 2;
  const MixedSegment* segments;
  int64_t num_segments;
  const map_t* location;
  int64_t num_rows;
  int64_t total;  // stored rows, over all segments

  explicit MapTable(const MixedRows& t)
      : segments(t.segments), num_segments(t.num_segments),
        location(static_cast<const map_t*>(t.map)), num_rows(t.num_rows), total(t.total) {}

  // Row r's codes. The segment is counted without a data-dependent branch.
  QEMBED_INLINE RowRef row(int64_t r) const {
    if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(num_rows)) return kInvalidRow;
    const int64_t loc = location[r];
    if (loc < 0 || loc >= total) return loc == -1 ? kPrunedRow : kInvalidRow;
    int64_t k = 0;
    for (int64_t j = 0; j + 1 < num_segments; ++j) k += loc >= segments[j].end;
    const MixedSegment& s = segments[k];
    return stored_row(s.data + (loc - s.start) * s.stride, s.step, s.bits, s.stride);
  }
  QEMBED_INLINE void prefetch_entry(int64_t r) const {  // a wild index only prefetches
    __builtin_prefetch(location + r, 0, 3);
  }
};

// Rows found through row ranges. A range lies in one segment, so it carries that segment's
// fields. Not a binary search over all ranges per row (range_position): its chain of
// dependent reads took half the lookup's time with rows in cache. The bucket index gives the
// ranges holding each bucket's first row; only the few buckets in which a range starts need a
// short search. Nothing to wait for, so rows are prefetched as far ahead as in single-width
// lookups: at half that, too few were in flight.
class RangeTable {
 public:
  static constexpr int64_t kLookahead = kPrefetchDistance;

  explicit RangeTable(const MixedRows& t)
      : ranges_(t.ranges), fields_(t.range_fields), bucket_(t.buckets), shift_(t.bucket_shift),
        num_rows_(t.num_rows) {}
  QEMBED_INLINE RowRef row(int64_t r) const {
    if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(num_rows_)) return kInvalidRow;
    // Row r's range lies between those of its bucket's first row and the next bucket's;
    // mostly they are one and the same.
    const int64_t b = r >> shift_, lo = bucket_[b];
    const MixedRange& g = fields_[last_range_from(ranges_, lo, bucket_[b + 1] - lo + 1, r)];
    if (!g.data) return kPrunedRow;
    return stored_row(g.data + (g.offset + r * g.stride), g.step, g.bits, g.stride);
  }
  QEMBED_INLINE void prefetch_entry(int64_t) const {}

 private:
  const int32_t* ranges_;
  const MixedRange* fields_;
  const int32_t* bucket_;
  int shift_;
  int64_t num_rows_;
};

// Rows found twice Table::kLookahead positions ahead of their use and kept in a ring, their
// lines prefetched from the ring kLookahead ahead; a table's own reads (map entries)
// prefetched before their rows are found. Finding a row is a chain of dependent reads:
// issued right before its prefetch, it delayed the prefetches, and fewer lines were in
// flight than in a single-width lookup. The prefetches go in bursts of kPrefetchBurst rows
// (prefetch.h): on Zen 3 they mattered all the more with ~100 instructions per row.
template <typename Table>
class RowPipeline {
  static constexpr int64_t kAhead = Table::kLookahead, kRing = 2 * kAhead;
  static constexpr int64_t kBurst = kPrefetchBurst;
  static_assert((kRing & (kRing - 1)) == 0, "the ring is indexed with a mask");
  static_assert(kBurst <= kAhead, "a burst prefetches rows found at least one take() before");
  static QEMBED_INLINE int64_t slot_of(int64_t p) { return p & (kRing - 1); }

 public:
  RowPipeline(const Table& t, const int64_t* idx, int64_t first, int64_t last)
      : t_(t), idx_(idx), first_(first), last_(last) {
    for (int64_t q = first; q < std::min(first + kRing, last); ++q)
      ring_[slot_of(q)] = t.row(idx[q]);
    for (int64_t q = first; q < std::min(first + kAhead, last); ++q) prefetch(ring_[slot_of(q)]);
    for (int64_t q = first + kRing; q < std::min(first + kRing + kAhead, last); ++q)
      t_.prefetch_entry(idx_[q]);
  }
  // The row at position p; positions are taken in increasing order, each once.
  QEMBED_INLINE RowRef take(int64_t p) {
    RowRef& slot = ring_[slot_of(p)];
    const RowRef r = slot;
    if (p + kRing < last_) slot = t_.row(idx_[p + kRing]);
    if (((p - first_) & (kBurst - 1)) == 0) {
      const int64_t q0 = p + kAhead, q1 = std::min(q0 + kBurst, last_);
      for (int64_t q = q0; q < q1; ++q) prefetch(ring_[slot_of(q)]);
    }
    if (p + kRing + kAhead < last_) t_.prefetch_entry(idx_[p + kRing + kAhead]);
    return r;
  }

 private:
  // A pruned or invalid row has no lines.
  static QEMBED_INLINE void prefetch(const RowRef& r) { prefetch_lines(r.codes, r.lines); }
  const Table& t_;
  const int64_t* idx_;
  int64_t first_, last_;
  RowRef ring_[kRing];
};

// What the first column block sums besides the columns: w * step * Qn and w over the stored
// rows, and whether every row was valid.
struct BagTerms {
  float shift = 0.0f;
  float beta_weight = 0.0f;
  bool ok = true;
};

// Adds the columns [8 * col8, ...) of the rows at positions [p0, p1), each decoded at its own
// width, into `accum`. The FIRST block takes its rows from the pipeline (prefetching those
// ahead) and sums the bag's terms; later ones (D > kLanes) find the rows again, in cache by
// then. FIRST is compile-time so that the first block's column offset folds away.
template <bool FIRST, typename Table, typename Acc>
QEMBED_INLINE void pool_block(Acc& accum, const Table& t, RowPipeline<Table>& rows,
                              const int64_t* idx, int64_t p0, int64_t p1, const float* psw,
                              int64_t col8, BagTerms& terms) {
  // Locals, not terms' fields: through the reference each row would wait on the previous
  // row's store.
  float shift = 0.0f, beta_weight = 0.0f;
  bool ok = true;
  for (int64_t p = p0; p < p1; ++p) {
    const RowRef r = FIRST ? rows.take(p) : t.row(idx[p]);
    if (r.bits <= 0) {
      ok = ok & (r.bits == 0);
      continue;
    }
    const float w = psw ? psw[p] : 1.0f, a = w * r.step;
    accum.add_any(FIRST ? r.codes : r.codes + col8 * r.bits, r.bits, a);
    if (FIRST) {
      shift += a * static_cast<float>(qmin(r.bits));
      beta_weight += w;
    }
  }
  if (FIRST) terms = {shift, beta_weight, ok};
}

// Output row o: positions [p0, p1) pooled in column blocks whose accumulators stay in
// registers, then + beta (per column). Returns false if it met (and skipped) an invalid
// index or location.
template <OutputType OUT, typename Table>
bool pool(const Table& t, RowPipeline<Table>& rows, const MixedLookupArgs& a, int64_t p0,
          int64_t p1, int64_t o, float* acc) {
  const int64_t dim = a.dim;
  const int64_t* idx = a.indices;
  const float* psw = a.per_sample_weights;
  BagTerms terms;
  with_accumulator(std::min<int64_t>(kLanes, dim), [&](auto&& accum) {
    pool_block<true>(accum, t, rows, idx, p0, p1, psw, 0, terms);
    accum.store(acc);
  });
  for (int64_t d0 = kLanes; d0 < dim; d0 += kLanes) {
    with_accumulator(std::min<int64_t>(kLanes, dim - d0), [&](auto&& accum) {
      BagTerms unused;
      pool_block<false>(accum, t, rows, idx, p0, p1, psw, d0 / 8, unused);
      accum.store(acc + d0);
    });
  }
  const float factor = (a.mean && p1 > p0) ? 1.0f / static_cast<float>(p1 - p0) : 1.0f;
  for (int64_t d = 0; d < dim; ++d)
    store_output<OUT>(a.out, o * dim + d,
                      (acc[d] + terms.shift + terms.beta_weight * a.beta[d]) * factor);
  return terms.ok;
}

template <OutputType OUT, typename Table>
bool lookup(const Table& t, const MixedLookupArgs& a, int64_t begin, int64_t end, float* acc) {
  auto start = [&](int64_t o) { return a.starts ? a.starts[o] : o; };
  RowPipeline<Table> rows(t, a.indices, start(begin), start(end));
  bool ok = true;
  for (int64_t o = begin; o < end; ++o)
    ok = pool<OUT>(t, rows, a, start(o), start(o + 1), o, acc) && ok;
  return ok;
}

}  // namespace

bool mpe_embedding_bag_lookup(const MixedLookupArgs& a, int64_t begin, int64_t end,
                              float* scratch) {
  return with_output_type(a.out_type, [&](auto out) {
    constexpr OutputType OUT = decltype(out)::value;
    if (!a.rows.map) return lookup<OUT>(RangeTable(a.rows), a, begin, end, scratch);
    if (a.rows.int16_map) return lookup<OUT>(MapTable<int16_t>(a.rows), a, begin, end, scratch);
    return lookup<OUT>(MapTable<int32_t>(a.rows), a, begin, end, scratch);
  });
}

QEMBED_ISA_END
}  // namespace qembed
