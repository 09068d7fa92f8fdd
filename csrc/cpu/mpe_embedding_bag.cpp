// mpe_embedding_bag: one lookup over a mixed-width table. Rows live in segments, one per bit
// width, each a uint8 [n_s, stride_s >= D*b_s/8] of offset-binary codes with one step
// alpha_s; a row map or row ranges (checks.h) give row r's position in the concatenation of
// the segments, or -1 for a pruned (0-bit) row. A stored row reads as alpha_s * q + beta, a
// pruned row as zeros (it still counts in a mean). The op checks its arguments and splits the
// output rows over threads; the kernel (isa/mpe_embedding_bag.cpp) reads the rows.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>
#include "../checks.h"
#include "../padded_rows.h"
#include "bags.h"
#include "huge_pages.h"
#include "isa/mpe_embedding_bag.h"

namespace qembed {
namespace {

// The row ranges' fields and their bucket index (isa/mpe_embedding_bag.h), about four buckets
// per range (at most 2^16), so that few hold a range's start.
struct RangeIndex {
  std::vector<MixedRange> fields;  // per range
  std::vector<int32_t> buckets;    // the range holding row b << shift, + 1 entry
  int shift = 0;

  RangeIndex(const int32_t* ranges, int64_t num_ranges, const std::vector<MixedSegment>& segs) {
    const int64_t num_rows = ranges[2 * num_ranges];
    for (int64_t k = 0; k < num_ranges; ++k) {
      const int64_t first = ranges[2 * k], pos = ranges[2 * k + 1];
      MixedRange g{nullptr, 0, 0, 0.0f, 0};
      if (pos >= 0) {
        const MixedSegment& s = *std::find_if(segs.begin(), segs.end(),
                                              [&](const MixedSegment& x) { return pos < x.end; });
        g = {s.data, (pos - s.start - first) * s.stride, s.stride, s.step, s.bits};
      }
      fields.push_back(g);
    }
    while ((num_rows >> shift) > std::min<int64_t>(4 * num_ranges, 1 << 16)) ++shift;
    const int64_t num_buckets = num_rows > 0 ? ((num_rows - 1) >> shift) + 1 : 0;
    int32_t k = 0;
    for (int64_t b = 0; b < num_buckets; ++b) {
      while (ranges[2 * (k + 1)] <= (b << shift)) ++k;  // ranges[2 * num_ranges] = rows
      buckets.push_back(k);
    }
    buckets.push_back(static_cast<int32_t>(num_ranges - 1));  // bounds the last bucket
  }
};

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

  std::vector<MixedSegment> segs;
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
  at::Tensor out = empty_on_huge_pages({num_out, dim}, beta.options().dtype(out_dtype));
  MixedLookupArgs args{{segs.data(), num_segments, total, 0, nullptr, false, nullptr, nullptr,
                        nullptr, 0},
                       idx, mode == POOL_NONE ? nullptr : starts.data(), psw,
                       mode == POOL_MEAN, beta.data_ptr<float>(), dim, out.data_ptr(),
                       output_type(out_dtype)};
  // Whether every index and location read was valid; positions after the last bag are not
  // read, but are checked all the same.
  auto run = [&](auto valid_position) {
    std::atomic<bool> all_ok{true};
    at::parallel_for(0, num_out, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(dim);
      if (!QEMBED_CPU_KERNEL(mpe_embedding_bag_lookup)(args, begin, end, scratch.data()))
        all_ok = false;
    });
    bool ok = all_ok;
    for (int64_t p = starts.empty() ? num_out : starts.back(); p < n && ok; ++p)
      ok = valid_position(p);
    return ok;
  };
  if (is_row_ranges(location)) {
    const int32_t* ranges = location.data_ptr<int32_t>();
    const int64_t num_ranges = location.size(0) - 1;
    std::vector<int64_t> ends;
    for (const MixedSegment& seg : segs) ends.push_back(seg.end);
    check_row_ranges(ranges, num_ranges, ends);
    const int64_t num_rows = ranges[2 * num_ranges];
    const RangeIndex index(ranges, num_ranges, segs);
    args.rows.num_rows = num_rows;
    args.rows.ranges = ranges;
    args.rows.range_fields = index.fields.data();
    args.rows.buckets = index.buckets.data();
    args.rows.bucket_shift = index.shift;
    // The lookup skipped what was invalid, which can only be an index; name the first.
    if (!run([&](int64_t p) { return idx[p] >= 0 && idx[p] < num_rows; }))
      check_indices_in_range(idx, n, num_rows);
    return narrow_columns(out, true_dim);
  }
  auto run_map = [&](const auto* map) {
    args.rows.num_rows = location.numel();
    args.rows.map = map;
    args.rows.int16_map = location.scalar_type() == at::kShort;
    const bool ok = run([&](int64_t p) {
      return idx[p] >= 0 && idx[p] < location.numel() && map[idx[p]] >= -1 &&
             map[idx[p]] < total;
    });
    if (ok) return;
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
