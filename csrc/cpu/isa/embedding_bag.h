// embedding_bag's kernels (the op: cpu/embedding_bag.cpp), one per instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"
#include "../output.h"

namespace qembed {

// A lookup over a packed table (layout.h), as the op has checked it.
struct LookupArgs {
  const uint8_t* table;
  int64_t num_rows, stride;
  const void* indices;  // int32 or int64
  bool int64_indices;
  const int64_t* starts;  // pooled: bag b covers positions [starts[b], starts[b + 1])
  const float* per_sample_weights;  // or null
  int64_t bits, dim, fmt;
  float table_step;  // SYM_TABLE
  bool mean;
  int64_t padding_idx;
  void* out;  // [bags or positions, dim] of out_type
  OutputType out_type;
};

// Bags [begin, end) pooled into their output rows; scratch holds dim floats. Returns false if
// an index was out of range (its rows were skipped).
QEMBED_DECLARE_CPU_KERNEL(bool embedding_bag_pool(const LookupArgs& a, int64_t begin,
                                                  int64_t end, float* scratch))
// Mode none: out[p] = psw_p * row[idx[p]] for positions [begin, end), rounded as dequantize
// rounds; the same return and scratch.
QEMBED_DECLARE_CPU_KERNEL(bool embedding_bag_rows(const LookupArgs& a, int64_t begin,
                                                  int64_t end, float* scratch))

}  // namespace qembed
