// mpe_embedding_bag: one lookup over a mixed-width table. Rows live in segments, one per bit
// width, each a uint8 [n_s, stride_s >= D*b_s/8] of offset-binary codes with one step
// alpha_s; a row map or row ranges (checks.h) give row r's position in the concatenation of
// the segments, or -1 for a pruned (0-bit) row. A stored row reads as alpha_s * q + beta, a
// pruned row as zeros (it still counts in a mean). Rows of any width mix freely within a bag.
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
#include "row_codec.h"

namespace qembed {
namespace {

struct Segment {
  const uint8_t* data;
  int64_t stride, bits, start, end;  // [start, end): its positions in the concatenation
  float step;
};

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
  const std::vector<Segment>& segments;
  const map_t* location;
  int64_t num_rows;
  int64_t total;  // stored rows, over all segments

  // Row r's codes. The segment is counted without a data-dependent branch.
  QEMBED_INLINE RowRef row(int64_t r) const {
    if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(num_rows)) return kInvalidRow;
    const int64_t loc = location[r];
    if (loc < 0 || loc >= total) return loc == -1 ? kPrunedRow : kInvalidRow;
    size_t k = 0;
    for (size_t j = 0; j + 1 < segments.size(); ++j) k += loc >= segments[j].end;
    const Segment& s = segments[k];
    return stored_row(s.data + (loc - s.start) * s.stride, s.step, s.bits, s.stride);
  }
  QEMBED_INLINE void prefetch_entry(int64_t r) const {  // a wild index only prefetches
    __builtin_prefetch(location + r, 0, 3);
  }
};

// Rows found through row ranges (checked before the lookup). A range lies in one segment,
// so it carries that segment's fields, its row r at data + offset + r * stride. Not a binary
// search over all ranges per row (range_position): its chain of dependent reads took half
// the lookup's time with rows in cache. A bucket index gives the ranges holding each
// bucket's first row; only the few buckets in which a range starts need a short search.
// Nothing to wait for, so rows are prefetched as far ahead as in single-width lookups: at
// half that, too few were in flight.
class RangeTable {
 public:
  static constexpr int64_t kLookahead = kPrefetchDistance;

  RangeTable(const int32_t* ranges, int64_t num_ranges, const std::vector<Segment>& segments)
      : ranges_(ranges), num_rows_(ranges[2 * num_ranges]) {
    for (int64_t k = 0; k < num_ranges; ++k) {
      const int64_t first = ranges[2 * k], pos = ranges[2 * k + 1];
      Range g{nullptr, 0, 0, 0.0f, 0};
      if (pos >= 0) {
        const Segment& s = *std::find_if(segments.begin(), segments.end(),
                                         [&](const Segment& x) { return pos < x.end; });
        g = {s.data, (pos - s.start - first) * s.stride, s.stride, s.step, s.bits};
      }
      fields_.push_back(g);
    }
    // About four buckets per range (at most 2^16), so that few hold a range's start.
    while ((num_rows_ >> shift_) > std::min<int64_t>(4 * num_ranges, 1 << 16)) ++shift_;
    const int64_t num_buckets = num_rows_ > 0 ? ((num_rows_ - 1) >> shift_) + 1 : 0;
    int32_t k = 0;
    for (int64_t b = 0; b < num_buckets; ++b) {
      while (ranges[2 * (k + 1)] <= (b << shift_)) ++k;  // ranges[2 * num_ranges] = rows
      bucket_.push_back(k);
    }
    bucket_.push_back(static_cast<int32_t>(num_ranges - 1));  // bounds the last bucket
  }
  QEMBED_INLINE RowRef row(int64_t r) const {
    if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(num_rows_)) return kInvalidRow;
    // Row r's range lies between those of its bucket's first row and the next bucket's;
    // mostly they are one and the same.
    const int64_t b = r >> shift_, lo = bucket_[b];
    const Range& g = fields_[last_range_from(ranges_, lo, bucket_[b + 1] - lo + 1, r)];
    if (!g.data) return kPrunedRow;
    return stored_row(g.data + (g.offset + r * g.stride), g.step, g.bits, g.stride);
  }
  QEMBED_INLINE void prefetch_entry(int64_t) const {}

 private:
  struct Range {
    const uint8_t* data;  // its segment's codes; null for a pruned range
    int64_t offset, stride;
    float step;
    int64_t bits;
  };
  const int32_t* ranges_;
  std::vector<Range> fields_;    // per range
  std::vector<int32_t> bucket_;  // bucket_[b]: the range holding row b << shift_, + 1 entry
  int shift_ = 0;
  int64_t num_rows_;
};

// Rows found twice Table::kLookahead positions ahead of their use and kept in a ring, their
// lines prefetched from the ring kLookahead ahead; a table's own reads (map entries)
// prefetched before their rows are found. Finding a row is a chain of dependent reads:
// issued right before its prefetch, it delayed the prefetches, and fewer lines were in
// flight than in a single-width lookup. The prefetches go in bursts of kPrefetchBurst rows
// (bags.h): on Zen 3 they mattered all the more with ~100 instructions per row.
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

// One output row: positions [p0, p1) pooled in column blocks whose accumulators stay in
// registers, then + beta (per column). Returns false if it met (and skipped) an invalid
// index or location.
template <typename Table, typename out_t>
bool pool(const Table& t, RowPipeline<Table>& rows, const int64_t* idx, int64_t p0, int64_t p1,
          const float* psw, bool mean, const float* beta, int64_t dim, float* acc, out_t* out) {
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
  const float factor = (mean && p1 > p0) ? 1.0f / static_cast<float>(p1 - p0) : 1.0f;
  for (int64_t d = 0; d < dim; ++d)
    out[d] = static_cast<out_t>((acc[d] + terms.shift + terms.beta_weight * beta[d]) * factor);
  return terms.ok;
}

// Returns false if an index or location was invalid.
template <typename Table, typename out_t>
bool lookup(const Table& t, const int64_t* idx, int64_t n, const float* psw,
            const std::vector<int64_t>* starts, bool mean, const float* beta, int64_t dim,
            out_t* out) {
  const bool pooled = starts != nullptr;
  const int64_t num_out = pooled ? static_cast<int64_t>(starts->size()) - 1 : n;
  auto start = [&](int64_t o) { return pooled ? (*starts)[o] : o; };
  std::atomic<bool> all_ok{true};
  at::parallel_for(0, num_out, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dim);
    RowPipeline<Table> rows(t, idx, start(begin), start(end));
    bool ok = true;
    for (int64_t o = begin; o < end; ++o)
      ok = pool(t, rows, idx, start(o), start(o + 1), psw, mean, beta, dim, acc.data(),
                out + o * dim) &&
           ok;
    if (!ok) all_ok = false;
  });
  // Positions after the last bag are not read, but are checked all the same.
  bool ok = all_ok;
  for (int64_t p = start(num_out); p < n && ok; ++p) ok = t.row(idx[p]).bits >= 0;
  return ok;
}

at::Tensor mpe_embedding_bag_cpu(at::TensorList segments, c10::IntArrayRef bits,
                                 const at::Tensor& steps_in, const at::Tensor& beta_in,
                                 const at::Tensor& location_in, const at::Tensor& indices_in,
                                 const at::Tensor& offsets_in,
                                 const c10::optional<at::Tensor>& psw_in, int64_t mode,
                                 bool include_last_offset, at::ScalarType out_dtype) {
  const char* op = "qembed.mpe_embedding_bag: ";
  const int64_t num_out =
      check_mixed_lookup_args(segments, bits, steps_in, beta_in, location_in, indices_in,
                              offsets_in, psw_in, mode, include_last_offset, out_dtype);
  const int64_t num_segments = static_cast<int64_t>(segments.size());
  // beta's pad is zero, with the codes' pad the value 0; the lookup runs at the padded width
  const at::Tensor beta = pad_columns(beta_in.reshape({1, -1})).reshape(-1).contiguous();
  const at::Tensor steps = steps_in.contiguous(), location = location_in.contiguous();
  const int64_t dim = beta.numel(), true_dim = beta_in.numel();

  std::vector<Segment> segs;
  std::vector<at::Tensor> keep;  // contiguous segments outlive the kernel
  int64_t total = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    const at::Tensor& seg = segments[s];
    keep.push_back(seg.contiguous());
    const float step = steps.data_ptr<float>()[s];
    TORCH_CHECK_VALUE(std::isfinite(step) && step > 0, op, "steps must be positive and finite");
    segs.push_back({keep.back().data_ptr<uint8_t>(), seg.size(1), bits[s], total,
                    total + seg.size(0), step});
    total += seg.size(0);
  }
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t n = indices.numel();
  const int64_t* idx = indices.data_ptr<int64_t>();
  at::Tensor psw_t;
  if (psw_in.has_value()) psw_t = psw_in->to(at::kFloat).contiguous();
  const float* psw = psw_t.defined() ? psw_t.data_ptr<float>() : nullptr;
  std::vector<int64_t> starts;
  if (mode != POOL_NONE) {
    const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
    starts = bag_bounds(offsets.data_ptr<int64_t>(), offsets.numel(), num_out, n);
  }
  at::Tensor out = at::empty({num_out, dim}, beta.options().dtype(out_dtype));
  const std::vector<int64_t>* bags = mode == POOL_NONE ? nullptr : &starts;
  const bool mean = mode == POOL_MEAN;
  const float* beta_p = beta.data_ptr<float>();
  auto run = [&](const auto& t) {
    if (out_dtype == at::kFloat)
      return lookup(t, idx, n, psw, bags, mean, beta_p, dim, out.data_ptr<float>());
    if (out_dtype == at::kHalf)
      return lookup(t, idx, n, psw, bags, mean, beta_p, dim, out.data_ptr<at::Half>());
    return lookup(t, idx, n, psw, bags, mean, beta_p, dim, out.data_ptr<at::BFloat16>());
  };
  if (is_row_ranges(location)) {
    const int32_t* ranges = location.data_ptr<int32_t>();
    const int64_t num_ranges = location.size(0) - 1;
    std::vector<int64_t> ends;
    for (const Segment& seg : segs) ends.push_back(seg.end);
    check_row_ranges(ranges, num_ranges, ends);
    // The lookup skipped what was invalid, which can only be an index; name the first.
    if (!run(RangeTable(ranges, num_ranges, segs)))
      check_indices_in_range(idx, n, ranges[2 * num_ranges]);
    return narrow_columns(out, true_dim);
  }
  auto run_map = [&](const auto* map) {
    using map_t = std::remove_const_t<std::remove_pointer_t<decltype(map)>>;
    if (run(MapTable<map_t>{segs, map, location.numel(), total})) return;
    // The lookup skipped what was invalid; name the first offender.
    check_indices_in_range(idx, n, location.numel());
    for (int64_t p = 0; p < n; ++p) {
      const int64_t loc = map[idx[p]];
      TORCH_CHECK_VALUE(loc >= -1 && loc < total, op, "location[", idx[p], "] = ", loc,
                        " is outside the segments (", total, " rows)");
    }
  };
  if (location.scalar_type() == at::kShort) run_map(location.data_ptr<int16_t>());
  else run_map(location.data_ptr<int32_t>());
  return narrow_columns(out, true_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("mpe_embedding_bag", &mpe_embedding_bag_cpu); }

}  // namespace qembed
