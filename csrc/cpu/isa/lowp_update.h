// lowp_update's kernels (the op: cpu/lowp_update.cpp), one per instruction set; the
// many-table update (embedding_bags_update) runs its tables through them too.
#pragma once
#include <cstdint>
#include "../../optim.h"
#include "../../rounding.h"
#include "../dispatch.h"

namespace qembed {

// Rows updated together (update_row.h's update_rows): each row's update is a chain of
// dependent steps (sums over the row, a square root, divisions), and rows side by side let
// the core overlap one row's chain with another's.
constexpr int kRowsTogether = 4;

// One table's buffers.
struct UpdateTable {
  uint8_t* rows;
  int64_t stride;
  float* table_step;  // SYM_TABLE: the table's step; else null
  float* state;       // [R, state_width] optimizer state
  float* step_state;  // the steps' Adam moments ([R, 2], or [2] for the table's step)
};

// One update of a table's distinct rows unique_rows[0, U), as the op has checked it. Rows are
// worked on at their padded width (layout.h): W = padded_dim(dim) floats each.
struct UpdateArgs {
  UpdateTable table;
  int64_t bits;
  const int64_t* unique_rows;
  int64_t num_unique;
  const float* grad;     // [U, W]; null where each row's gradient is summed as it is updated
  const float* weights;  // [U, W] fp32 weights to start from instead of the codes; or null
  // [U, W]: the updated weights, kept for the caller (weights_out) or for the second pass
  // (one step per table, learnt); else null.
  float* kept;
  bool kept_for_caller;  // then rows skipped read NaN there
  float* lsq;            // [U] with one step per table, learnt: each row's step gradient
  uint8_t* skipped;      // [U]: set to 1 where the gradient or given weights were not finite
  UpdateConfig config;
  RoundingKey rounding;  // row_key unused
};

// Rows [begin, end) of unique_rows: dequantized (or the given weights), stepped by the
// optimizer, their steps learnt and (unless the table's step is learnt, which waits for every
// row's step gradient) re-quantized. scratch holds 3 * W * kRowsTogether floats.
QEMBED_DECLARE_CPU_KERNEL(void lowp_update_rows(const UpdateArgs& a, int64_t begin, int64_t end,
                                                float* scratch))
// The second pass with one learnt step per table: the step moved by the step gradients of the
// rows not skipped, summed in row order (stored, and returned) ...
QEMBED_DECLARE_CPU_KERNEL(float lowp_update_table_step(const UpdateArgs& a, int64_t num_skipped))
// ... then rows [begin, end) not skipped re-quantized from `kept` at that step.
QEMBED_DECLARE_CPU_KERNEL(void lowp_update_encode(const UpdateArgs& a, int64_t begin,
                                                  int64_t end, float step))

}  // namespace qembed
