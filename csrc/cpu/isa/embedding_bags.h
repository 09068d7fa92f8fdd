// embedding_bags' kernel (the op: cpu/embedding_bags.cpp), one per instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"
#include "../output.h"

namespace qembed {

// One packed table (layout.h), as the op has checked it.
struct BagsTable {
  const uint8_t* rows;
  int64_t num_rows, stride, dim, bits, fmt;
  float step;  // SYM_TABLE
};

// A many-table lookup: feature f reads table feature_tables[f] for its B bags, whose ids lie
// in values[offsets[f * B + b], offsets[f * B + b + 1]), and writes its block of each output
// row from column feature_columns[f].
struct BagsLookupArgs {
  const BagsTable* tables;
  const void* values;  // int32 or int64
  bool int64_values;
  const int64_t* offsets;  // [F * B + 1]
  int64_t batch, num_features;
  const int64_t* feature_tables;
  const int64_t* feature_columns;
  const int64_t* poolings;
  const float* per_sample_weights;  // or null
  int64_t width;
  void* out;  // [B, width] of out_type
  OutputType out_type;
  // Write the output with streaming stores (pool_bag.h: store_row_streaming): fp32, every
  // block 32-byte aligned, and too large to stay in cache for its reader.
  bool stream_output;
};

// Bags [first_bag, end_bag) of every feature, one feature after another, the next feature's
// first rows prefetched before the current one's are read; acc holds the largest dim in
// floats. Returns false if an id was out of range (its row was skipped).
QEMBED_DECLARE_CPU_KERNEL(bool embedding_bags_chunk(const BagsLookupArgs& a, int64_t first_bag,
                                                    int64_t end_bag, float* acc))

}  // namespace qembed
