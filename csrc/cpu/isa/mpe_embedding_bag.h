// mpe_embedding_bag's kernel (the op: cpu/mpe_embedding_bag.cpp), one per instruction set.
#pragma once
#include <cstdint>
#include "../dispatch.h"
#include "../output.h"

namespace qembed {

// A segment of rows of one width: its codes, and its positions [start, end) in the
// concatenation of the segments.
struct MixedSegment {
  const uint8_t* data;
  int64_t stride, bits, start, end;
  float step;
};

// A row range's fields, taken from its segment: row r of the range lies at data + offset +
// r * stride. data is null for a pruned range.
struct MixedRange {
  const uint8_t* data;
  int64_t offset, stride;
  float step;
  int64_t bits;
};

// Where the rows are: a row map (int16 or int32 location per row) or row ranges with a bucket
// index (buckets[b]: the range holding row b << bucket_shift; one entry more than the
// buckets). The op has checked the ranges; map entries are checked as they are read.
struct MixedRows {
  const MixedSegment* segments;
  int64_t num_segments;
  int64_t total;     // stored rows, over all segments
  int64_t num_rows;  // of the table
  const void* map;   // null with ranges
  bool int16_map;
  const int32_t* ranges;  // [num_ranges + 1][2]
  const MixedRange* range_fields;
  const int32_t* buckets;
  int bucket_shift;
};

struct MixedLookupArgs {
  MixedRows rows;
  const int64_t* indices;
  const int64_t* starts;  // pooled: bag b covers positions [starts[b], starts[b + 1]); else null
  const float* per_sample_weights;  // or null
  bool mean;
  const float* beta;  // [dim]
  int64_t dim;
  void* out;  // [bags or positions, dim] of out_type
  OutputType out_type;
};

// Output rows [begin, end) (bags, or positions without pooling); scratch holds dim floats.
// Returns false if it met (and skipped) an index out of range or a location outside the
// segments.
QEMBED_DECLARE_CPU_KERNEL(bool mpe_embedding_bag_lookup(const MixedLookupArgs& a, int64_t begin,
                                                        int64_t end, float* scratch))

}  // namespace qembed
