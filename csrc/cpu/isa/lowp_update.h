// lowp_update's kernels (the op: cpu/lowp_update.cpp), one per instruction set.
#pragma once
#include <cstdint>
#include "../../optim.h"
#include "../../rounding.h"
#include "../dispatch.h"

namespace qembed {

// One update of the distinct rows unique_rows[0, U), as the op has checked it.
struct UpdateArgs {
  uint8_t* table;
  int64_t stride, bits;
  float* table_step;  // SYM_TABLE: the table's one step; else null
  float* state;       // [R, state_width] optimizer state
  float* step_state;  // the steps' Adam moments ([R, 2], or [2] for the table's step)
  const int64_t* unique_rows;
  const float* grad;     // [U, dim]
  const float* weights;  // [U, dim] fp32 weights to start from instead of the codes; or null
  // [U, dim]: the updated weights, kept for the caller (weights_out) or for the second pass
  // (one step per table, learnt); else null.
  float* kept;
  bool kept_for_caller;  // then rows skipped read NaN there
  float* lsq;        // [U]: each row's step gradient, where the second pass sums them
  uint8_t* skipped;  // [U]: 1 where the gradient or given weights were not finite
  UpdateConfig config;
  RoundingKey rounding;  // row_key unused
};

// Rows [begin, end) of unique_rows: dequantized (or the given weights), stepped by the
// optimizer, their steps learnt and (unless the table's step is learnt, which waits for every
// row's step gradient) re-quantized. scratch holds 2 * dim floats.
QEMBED_DECLARE_CPU_KERNEL(void lowp_update_rows(const UpdateArgs& a, int64_t begin, int64_t end,
                                                float* scratch))
// The second pass with one learnt step per table: rows [begin, end) not skipped re-quantized
// from `kept` with the table's new step.
QEMBED_DECLARE_CPU_KERNEL(void lowp_update_encode(const UpdateArgs& a, int64_t begin,
                                                  int64_t end, float step))

}  // namespace qembed
