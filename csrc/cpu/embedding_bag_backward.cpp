// embedding_bag_backward: the gradient of the fused lookup with respect to the rows it read,
// one row per distinct index (never a dense [R, D] gradient).
// Positions are sorted by index with a stable sort, so repeats of an index keep their batch
// order, and each distinct index is summed by one thread in that order: the result is the
// same for any thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>
#include "../checks.h"
#include "bags.h"

namespace qembed {
namespace {

// Positions [0, n) ordered by key, equal keys in position order, with their keys: an LSD
// radix sort with only as many 11-bit digits as the largest key needs. Where a key and a
// position fit one 64-bit word together (keys below 2^40 for a million positions) the sort
// moves (key, position) words, so each pass streams one array; otherwise positions, each
// pass reading its key through the position. Sequential on purpose: the batch is small, and
// a sort split over threads (torch.sort's) stalls at every pass when the machine is
// oversubscribed.
struct SortedPositions {
  std::vector<int64_t> pos, key;
};

SortedPositions sorted_positions(const int64_t* key, int64_t n) {
  constexpr int kDigitBits = 11;
  constexpr int64_t kRadix = int64_t{1} << kDigitBits;
  int64_t max_key = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(key[i] >= 0, "qembed.embedding_bag_backward: negative index ", key[i],
                      " at position ", i);
    max_key = std::max(max_key, key[i]);
  }
  const int key_bits = 64 - __builtin_clzll(static_cast<uint64_t>(max_key) | 1);
  const int pos_bits = 64 - __builtin_clzll(static_cast<uint64_t>(std::max<int64_t>(n - 1, 1)));
  std::vector<int64_t> count(kRadix + 1);
  SortedPositions out{std::vector<int64_t>(n), std::vector<int64_t>(n)};
  if (key_bits + pos_bits <= 64) {
    std::vector<uint64_t> word(n), next(n);
    for (int64_t i = 0; i < n; ++i)
      word[i] = static_cast<uint64_t>(key[i]) << pos_bits | static_cast<uint64_t>(i);
    for (int shift = pos_bits; shift < pos_bits + key_bits; shift += kDigitBits) {
      std::fill(count.begin(), count.end(), 0);
      for (int64_t i = 0; i < n; ++i) ++count[((word[i] >> shift) & (kRadix - 1)) + 1];
      std::partial_sum(count.begin(), count.end(), count.begin());
      for (int64_t i = 0; i < n; ++i) next[count[(word[i] >> shift) & (kRadix - 1)]++] = word[i];
      word.swap(next);
    }
    const uint64_t pos_mask = (uint64_t{1} << pos_bits) - 1;
    for (int64_t j = 0; j < n; ++j) {
      out.pos[j] = static_cast<int64_t>(word[j] & pos_mask);
      out.key[j] = static_cast<int64_t>(word[j] >> pos_bits);
    }
    return out;
  }
  std::vector<int64_t>& order = out.pos;
  std::vector<int64_t> next(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  for (int shift = 0; shift < key_bits; shift += kDigitBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[((key[i] >> shift) & (kRadix - 1)) + 1];
    std::partial_sum(count.begin(), count.end(), count.begin());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = order[i];
      next[count[(key[p] >> shift) & (kRadix - 1)]++] = p;
    }
    order.swap(next);
  }
  for (int64_t j = 0; j < n; ++j) out.key[j] = key[order[j]];
  return out;
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    const c10::optional<at::Tensor>& psw_in, int64_t mode, bool include_last_offset,
    int64_t padding_idx) {
  check_backward_args(grad_out_in, indices_in, mode);
  const at::Tensor grad_out = grad_out_in.to(at::kFloat).contiguous();
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t n = indices.numel(), dim = grad_out.size(1);

  at::Tensor psw_t;
  if (psw_in.has_value()) {
    TORCH_CHECK_VALUE(mode != POOL_MEAN,
                      "qembed: per_sample_weights are only supported with mode 'sum' or 'none'");
    TORCH_CHECK_VALUE(psw_in->dim() == 1 && psw_in->numel() == n,
                      "qembed: per_sample_weights must have the shape of indices");
    psw_t = psw_in->to(at::kFloat).contiguous();
  }
  const float* psw = psw_t.defined() ? psw_t.data_ptr<float>() : nullptr;

  // bag[p] and the factor each position's gradient is scaled by.
  std::vector<int64_t> bag;
  if (mode == POOL_NONE) {
    TORCH_CHECK_VALUE(grad_out.size(0) == n, "qembed.embedding_bag_backward: grad_out has ",
                      grad_out.size(0), " rows, expected one per index (", n, ")");
    bag.resize(n);
    for (int64_t p = 0; p < n; ++p) bag[p] = p;
  } else {
    check_index_dtype(offsets_in, "offsets");
    const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
    const int64_t num_bags = offsets.numel() - (include_last_offset ? 1 : 0);
    TORCH_CHECK_VALUE(num_bags >= 0 && grad_out.size(0) == num_bags,
                      "qembed.embedding_bag_backward: grad_out has ", grad_out.size(0),
                      " rows, expected one per bag (", num_bags, ")");
    bag = bag_of_positions(bag_bounds(offsets.data_ptr<int64_t>(), offsets.numel(), num_bags, n));
  }
  const int64_t used = static_cast<int64_t>(bag.size());
  const int64_t* idx = indices.data_ptr<int64_t>();
  std::vector<float> factor(used, 1.0f);
  if (psw) {
    for (int64_t p = 0; p < used; ++p) factor[p] = psw[p];
  } else if (mode == POOL_MEAN) {
    std::vector<int64_t> count(grad_out.size(0), 0);
    for (int64_t p = 0; p < used; ++p) count[bag[p]] += idx[p] != padding_idx;
    for (int64_t p = 0; p < used; ++p)
      factor[p] = 1.0f / static_cast<float>(std::max<int64_t>(count[bag[p]], 1));
  }

  const SortedPositions sorted = sorted_positions(idx, used);
  const std::vector<int64_t>& pos = sorted.pos;
  const std::vector<int64_t>& key = sorted.key;
  std::vector<int64_t> seg;  // starts of the runs of equal keys, padding_idx's run left out
  for (int64_t j = 0; j < used; ++j)
    if ((j == 0 || key[j] != key[j - 1]) && key[j] != padding_idx) seg.push_back(j);
  const int64_t num_unique = static_cast<int64_t>(seg.size());

  at::Tensor unique_rows = at::empty({num_unique}, indices.options());
  at::Tensor grad_rows = at::empty({num_unique, dim}, grad_out.options());
  int64_t* uniq = unique_rows.data_ptr<int64_t>();
  float* out = grad_rows.data_ptr<float>();
  const float* go = grad_out.data_ptr<float>();
  at::parallel_for(0, num_unique, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float* acc = out + k * dim;
      std::fill(acc, acc + dim, 0.0f);
      uniq[k] = key[seg[k]];
      for (int64_t j = seg[k]; j < used && key[j] == uniq[k]; ++j) {
        const int64_t p = pos[j];
        const float f = factor[p];
        const float* g = go + bag[p] * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += g[d] * f;
      }
    }
  });
  return {unique_rows, grad_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) {
  m.impl("embedding_bag_backward", &embedding_bag_backward_cpu);
}

}  // namespace qembed
