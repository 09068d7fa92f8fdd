// mpe_embedding_bag: one lookup over a mixed-width table. Rows live in segments, one per bit
// width, each a uint8 [n_s, stride_s >= D*b_s/8] of offset-binary codes with one step
// alpha_s; location[r] is row r's position in the concatenation of the segments, or -1 for
// a pruned (0-bit) row. A stored row reads as alpha_s * q + beta, a pruned row as zeros
// (it still counts in a mean). Rows of any width mix freely within a bag.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>
#include "../checks.h"
#include "bags.h"
#include "row_codec.h"

namespace qembed {
namespace {

struct Segment {
  const uint8_t* data;
  int64_t stride, bits, start, end;  // [start, end): its positions in the concatenation
  float step;
  bool prefetch_tail;
};

template <typename map_t>  // int16 for tables under 2^15 rows, else int32
struct MixedTable {
  std::vector<Segment> segments;
  const map_t* location;
  const float* beta;
  int64_t dim;

  // The segment holding position loc, counted without a data-dependent branch.
  const Segment* find(int64_t loc) const {
    size_t s = 0;
    for (size_t k = 0; k + 1 < segments.size(); ++k) s += loc >= segments[k].end;
    return &segments[s];
  }

  // Row r's codes and segment; null codes for a pruned row.
  std::pair<const uint8_t*, const Segment*> row(int64_t r) const {
    const int64_t loc = location[r];
    if (loc < 0) return {nullptr, nullptr};
    const Segment* s = find(loc);
    return {s->data + (loc - s->start) * s->stride, s};
  }
};

// One output row: positions [p0, p1) pooled in column blocks whose accumulators stay in
// registers, each row decoded at its own width; rows up to `last` are prefetched.
template <typename map_t, typename out_t>
void pool(const MixedTable<map_t>& t, const int64_t* idx, int64_t p0, int64_t p1, int64_t last,
          const float* psw, bool mean, float* acc, out_t* out) {
  const int64_t dim = t.dim;
  float shift = 0.0f, beta_weight = 0.0f;  // sum of w * step * Qn, and of w over stored rows
  for (int64_t d0 = 0; d0 < dim; d0 += kLanes) {
    Accumulator accum(std::min<int64_t>(kLanes, dim - d0));
    for (int64_t p = p0; p < p1; ++p) {
      if (d0 == 0 && p + 2 * kPrefetchDistance < last)  // the map entry first, then
        __builtin_prefetch(t.location + idx[p + 2 * kPrefetchDistance], 0, 3);
      if (d0 == 0 && p + kPrefetchDistance < last) {  // the row it points to
        const auto ahead = t.row(idx[p + kPrefetchDistance]);
        if (ahead.first)
          prefetch_row(ahead.first, ahead.second->stride, ahead.second->prefetch_tail);
      }
      const auto [codes, seg] = t.row(idx[p]);
      if (!codes) continue;
      const float w = psw ? psw[p] : 1.0f, a = w * seg->step;
      accum.add_any(codes + d0 * seg->bits / 8, static_cast<int>(seg->bits), a);
      if (d0 == 0) {
        shift += a * static_cast<float>(qmin(seg->bits));
        beta_weight += w;
      }
    }
    accum.store(acc + d0);
  }
  const float factor = (mean && p1 > p0) ? 1.0f / static_cast<float>(p1 - p0) : 1.0f;
  for (int64_t d = 0; d < dim; ++d)
    out[d] = static_cast<out_t>((acc[d] + shift + beta_weight * t.beta[d]) * factor);
}

template <typename map_t, typename out_t>
void lookup(const MixedTable<map_t>& t, const int64_t* idx, int64_t n, const float* psw,
            const std::vector<int64_t>* starts, bool mean, out_t* out) {
  const bool pooled = starts != nullptr;
  const int64_t num_out = pooled ? static_cast<int64_t>(starts->size()) - 1 : n;
  at::parallel_for(0, num_out, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(t.dim);
    const int64_t last = pooled ? (*starts)[end] : end;
    for (int64_t o = begin; o < end; ++o) {
      const int64_t p0 = pooled ? (*starts)[o] : o, p1 = pooled ? (*starts)[o + 1] : o + 1;
      pool(t, idx, p0, p1, last, psw, mean, acc.data(), out + o * t.dim);
    }
  });
}

at::Tensor mpe_embedding_bag_cpu(at::TensorList segments, c10::IntArrayRef bits,
                                 const at::Tensor& steps_in, const at::Tensor& beta_in,
                                 const at::Tensor& location_in, const at::Tensor& indices_in,
                                 const at::Tensor& offsets_in,
                                 const c10::optional<at::Tensor>& psw_in, int64_t mode,
                                 bool include_last_offset, at::ScalarType out_dtype) {
  const char* op = "qembed.mpe_embedding_bag: ";
  check_mixed_lookup_args(segments, bits, steps_in, beta_in, location_in, mode, out_dtype);
  const int64_t num_segments = static_cast<int64_t>(segments.size());
  const at::Tensor beta = beta_in.contiguous(), steps = steps_in.contiguous();
  const at::Tensor location = location_in.contiguous();
  const int64_t dim = beta.numel();

  std::vector<Segment> segs;
  std::vector<at::Tensor> keep;  // contiguous segments outlive the kernel
  int64_t total = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    const at::Tensor& seg = segments[s];
    keep.push_back(seg.contiguous());
    const float step = steps.data_ptr<float>()[s];
    TORCH_CHECK_VALUE(std::isfinite(step) && step > 0, op, "steps must be positive and finite");
    segs.push_back({keep.back().data_ptr<uint8_t>(), seg.size(1), bits[s], total,
                    total + seg.size(0), step, prefetch_needs_tail(seg.size(1))});
    total += seg.size(0);
  }
  check_index_dtype(indices_in, "indices");
  check_same_device(indices_in, "indices", beta, "beta");
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t n = indices.numel();
  const int64_t* idx = indices.data_ptr<int64_t>();
  check_indices_in_range(idx, n, location.numel());
  at::Tensor psw_t;
  if (psw_in.has_value()) {
    TORCH_CHECK_VALUE(mode != POOL_MEAN,
                      "qembed: per_sample_weights are only supported with mode 'sum' or 'none'");
    TORCH_CHECK_VALUE(psw_in->dim() == 1 && psw_in->numel() == n,
                      "qembed: per_sample_weights must have the shape of indices (", n, ",)");
    psw_t = psw_in->to(at::kFloat).contiguous();
  }
  const float* psw = psw_t.defined() ? psw_t.data_ptr<float>() : nullptr;
  std::vector<int64_t> starts;
  int64_t num_out = n;
  if (mode != POOL_NONE) {
    check_index_dtype(offsets_in, "offsets");
    const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
    num_out = offsets.numel() - (include_last_offset ? 1 : 0);
    TORCH_CHECK_VALUE(num_out >= 0, "qembed: with include_last_offset, offsets needs at least "
                      "one element");
    starts = bag_bounds(offsets.data_ptr<int64_t>(), offsets.numel(), num_out, n);
  }
  at::Tensor out = at::empty({num_out, dim}, beta.options().dtype(out_dtype));
  const std::vector<int64_t>* bags = mode == POOL_NONE ? nullptr : &starts;
  const bool mean = mode == POOL_MEAN;
  auto run = [&](const auto* map) {
    for (int64_t p = 0; p < n; ++p) {  // only the rows read: the map may be large
      const int64_t loc = map[idx[p]];
      TORCH_CHECK_VALUE(loc >= -1 && loc < total, op, "location[", idx[p], "] = ", loc,
                        " is outside the segments (", total, " rows)");
    }
    const MixedTable<std::remove_const_t<std::remove_pointer_t<decltype(map)>>> t{
        segs, map, beta.data_ptr<float>(), dim};
    if (out_dtype == at::kFloat) lookup(t, idx, n, psw, bags, mean, out.data_ptr<float>());
    else if (out_dtype == at::kHalf) lookup(t, idx, n, psw, bags, mean, out.data_ptr<at::Half>());
    else lookup(t, idx, n, psw, bags, mean, out.data_ptr<at::BFloat16>());
  };
  if (location.scalar_type() == at::kShort) run(location.data_ptr<int16_t>());
  else run(location.data_ptr<int32_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("mpe_embedding_bag", &mpe_embedding_bag_cpu); }

}  // namespace qembed
