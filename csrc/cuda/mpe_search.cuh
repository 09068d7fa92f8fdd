// What the MPE search's CUDA ops share: the quantizer as a kernel argument and a row's
// probabilities, found without trusting row_group (checked on the device, not the host).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include "../checks.h"
#include "common.cuh"

namespace qembed {

constexpr int kMaxCandidates = 16;
constexpr int kBadAlpha = 16;  // error flag beside common.cuh's

struct Search {
  const float* weight;
  const int64_t* row_group;
  const float* probs;
  const float* alpha;
  const float* beta;
  int64_t rows, dim, groups;
  int m;
  int32_t bits[kMaxCandidates];
  float scale[kMaxCandidates];  // LSQ gradient scales (backward only)
};

// The probabilities of row r's group, or null (flagged) for a row or group out of range.
__device__ __forceinline__ const float* row_probs(const Search& q, int64_t r, int* error) {
  if (r < 0 || r >= q.rows) {
    if (error != nullptr) atomicOr(error, kBadIndex);
    return nullptr;
  }
  const int64_t g = q.row_group[r];
  if (g < 0 || g >= q.groups) {
    if (error != nullptr) atomicOr(error, kBadParam);
    return nullptr;
  }
  return q.probs + g * q.m;
}

// The contiguous tensors a Search points into; they outlive the kernels that use it.
struct SearchTensors {
  at::Tensor weight, row_group, probs, alpha, beta;
  Search view(c10::IntArrayRef bits) const {
    Search q{weight.data_ptr<float>(), row_group.data_ptr<int64_t>(), probs.data_ptr<float>(),
             alpha.data_ptr<float>(), beta.data_ptr<float>(), weight.size(0), weight.size(1),
             probs.size(0), static_cast<int>(bits.size()), {}, {}};
    for (int k = 0; k < q.m; ++k) q.bits[k] = static_cast<int32_t>(bits[k]);
    return q;
  }
};

// Shape and device checks (check_search_args), at most kMaxCandidates widths.
inline SearchTensors search_tensors(const char* op, const at::Tensor& weight,
                                    const at::Tensor& row_group, const at::Tensor& probs,
                                    const at::Tensor& alpha, const at::Tensor& beta,
                                    c10::IntArrayRef bits) {
  SearchTensors t{weight.contiguous(), row_group.contiguous(), probs.contiguous(),
                  alpha.contiguous(), beta.contiguous()};
  check_search_args(op, t.weight, t.row_group, t.probs, t.alpha, t.beta, bits);
  TORCH_CHECK_VALUE(static_cast<int64_t>(bits.size()) <= kMaxCandidates, "qembed.", op,
                    ": at most ", kMaxCandidates, " candidate widths on CUDA, got ", bits.size());
  return t;
}

// In validate mode: whether alpha is positive and finite for every positive width.
__device__ __forceinline__ void check_alpha(const Search& q, int* error) {
  for (int k = 0; k < q.m; ++k)
    if (q.bits[k] > 0 && !(isfinite(q.alpha[k]) && q.alpha[k] > 0.0f))
      atomicOr(error, kBadAlpha);
}

}  // namespace qembed
