// The MPE search's kernels (the ops: cpu/mpe_search_forward.cpp, cpu/mpe_search_backward.cpp),
// one per instruction set. Their quantizer, per candidate width b:
//   Q_b(w) = alpha_b * clamp(round((w - beta) / alpha_b), Qn_b, Qp_b) + beta,   Q_0 = 0.
#pragma once
#include <cstdint>
#include "../dispatch.h"

namespace qembed {

// The quantizer of the search, as cpu/mpe.h has checked it: candidate widths bits[m], steps
// alpha [m], offset beta [D], the group of every row [R] and the groups' probabilities
// [G, m] (row r's at probs + row_group[r] * m).
struct SearchQuantizer {
  const int64_t* bits;
  int64_t num_candidates;
  const float* alpha;
  const float* beta;
  const int64_t* row_group;
  const float* probs;
  int64_t dim;
};

struct SearchForwardArgs {
  SearchQuantizer q;
  const float* weight;    // fp32 [R, D]
  const int64_t* indices;  // checked
  const int64_t* starts;  // pooled: bag b covers positions [starts[b], starts[b + 1]); else null
  bool mean;
  float* out;
};

// Output rows [begin, end) (bags, or positions without pooling): each row read replaced by
// its expected quantized value sum_b p[g(r), b] * Q_b(w_r), then pooled. scratch holds dim
// floats.
QEMBED_DECLARE_CPU_KERNEL(void mpe_search_forward_rows(const SearchForwardArgs& a, int64_t begin,
                                                       int64_t end, float* scratch))

struct SearchBackwardArgs {
  SearchQuantizer q;
  const float* weight;
  const int64_t* unique_rows;  // checked
  const float* grad;           // [U, D]
  const float* scale;          // [m]: LSQ's gradient scale per candidate
  float* grad_weight;          // [U, D], zeros
  // Per-row partial sums, reduced in row order by the op: [U, m], [U, m], [U, D] (zeros).
  float* part_alpha;
  float* part_probs;
  float* part_beta;
};

// Distinct rows [begin, end): their weight gradient and partial sums (the op's comment has
// the formulas).
QEMBED_DECLARE_CPU_KERNEL(void mpe_search_backward_rows(const SearchBackwardArgs& a,
                                                        int64_t begin, int64_t end))

}  // namespace qembed
