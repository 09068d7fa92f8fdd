// Bag boundaries and index checks shared by the lookups and the backward, and the lookups'
// output type as their kernels name it.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cstdint>
#include <algorithm>
#include <vector>
#include "output.h"

namespace qembed {

// output_dtype, checked to be one of the three.
inline OutputType output_type(at::ScalarType dtype) {
  if (dtype == at::kHalf) return OutputType::kHalf;
  if (dtype == at::kBFloat16) return OutputType::kBFloat16;
  return OutputType::kFloat;
}

template <typename index_t>
void check_indices_in_range(const index_t* idx, int64_t n, int64_t num_rows) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < num_rows, "qembed.embedding_bag: index ",
                      static_cast<int64_t>(idx[i]), " at position ", i,
                      " is out of range for a table of ", num_rows, " rows");
}

// Bag b covers positions [starts[b], starts[b + 1]); returns starts with B + 1 entries.
template <typename offset_t>
std::vector<int64_t> bag_bounds(const offset_t* off, int64_t num_offsets, int64_t num_bags,
                                int64_t num_indices) {
  std::vector<int64_t> starts(num_bags + 1);
  for (int64_t b = 0; b < num_offsets; ++b) {
    const int64_t o = off[b];
    TORCH_CHECK_VALUE(b > 0 || o == 0, "qembed.embedding_bag: offsets[0] must be 0, got ", o);
    TORCH_CHECK_VALUE(b == 0 || o >= off[b - 1], "qembed.embedding_bag: offsets must be ",
                      "non-decreasing, but offsets[", b, "] = ", o, " < offsets[", b - 1,
                      "] = ", static_cast<int64_t>(off[b - 1]));
    TORCH_CHECK_VALUE(o <= num_indices, "qembed.embedding_bag: offsets[", b, "] = ", o,
                      " is past the end of indices (", num_indices, ")");
    if (b <= num_bags) starts[b] = o;
  }
  if (num_offsets == num_bags) starts[num_bags] = num_indices;
  return starts;
}

// The bag of each position in [0, starts.back()); positions past the last bag belong to none
// (with no bags at all, none does).
inline std::vector<int64_t> bag_of_positions(const std::vector<int64_t>& starts) {
  std::vector<int64_t> bag(starts.size() > 1 ? starts.back() : 0);
  for (size_t b = 0; b + 1 < starts.size(); ++b)
    for (int64_t p = starts[b]; p < starts[b + 1]; ++p) bag[p] = static_cast<int64_t>(b);
  return bag;
}

}  // namespace qembed
