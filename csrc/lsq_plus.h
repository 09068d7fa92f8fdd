// MPE's LSQ+ quantizer of one value, written once for CPU and CUDA:
//   Q_b(w) = a * clamp(round((w - beta) / a), Qn_b, Qp_b) + beta,   Q_0 = 0,
// and the gradient scale of its step, 1 / sqrt(max(Qp_b, 1) * numel). The arithmetic order
// matches qembed/reference.py (lsq_plus).
#pragma once
#include <cmath>
#include "rounding.h"

namespace qembed {
QEMBED_ISA_BEGIN

// Q_b(w) for a positive width b with step a; lo, hi = Qn_b, Qp_b.
QEMBED_HD float lsq_plus_value(float w, float beta, float a, int32_t lo, int32_t hi) {
  const float x = (w - beta) / a;
  return a * static_cast<float>(round_to_code(x, 0.0f, false, lo, hi)) + beta;
}

// Qp = 0 at one bit counts as 1.
inline float lsq_plus_grad_scale(int64_t bits, int64_t numel) {
  const int32_t qp = bits > 1 ? qmax(bits) : 1;
  return 1.0f / std::sqrt(static_cast<float>(qp) * static_cast<float>(numel));
}

QEMBED_ISA_END
}  // namespace qembed
