// The per-element arithmetic of the fused low-precision update (lowp_update), written once
// for CPU and CUDA. Both compile it without contraction into fused multiply-adds
// (-ffp-contract=off, nvcc --fmad=false) and with IEEE division and square root, so a row
// updated on either device gets the bits qembed/reference.py computes. The sums over a row
// (Adagrad's mean square, LSQ's step gradient) stay with each device's loops, in the order
// kSumLanes describes.
#pragma once
#include <cmath>
#include "layout.h"

namespace qembed {

enum Optimizer : int64_t { OPT_SGD = 0, OPT_ADAGRAD = 1, OPT_ADAM = 2, OPT_NONE = 3 };
enum StepOptimizer : int64_t { STEP_SGD = 0, STEP_ADAM = 1 };

// Steps never reach zero or below: a zero step would divide by zero when re-quantizing.
constexpr float kMinStep = 1e-10f;

struct UpdateConfig {
  int64_t dim, fmt, optimizer, step_optimizer;
  float lr, eps, wd, step_lr;
  float b1, b2, omb1, omb2, bc1, bc2;  // Adam: betas, 1 - betas, bias corrections
  bool learn_step;
};

// The fp32 constants of an update, rounded once on the host from the op's arguments.
inline UpdateConfig make_update_config(int64_t dim, int64_t fmt, int64_t optimizer, double lr,
                                       double eps, double weight_decay, double beta1,
                                       double beta2, int64_t iteration, bool learn_step,
                                       int64_t step_optimizer, double step_lr) {
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  return {dim, fmt, optimizer, learn_step ? step_optimizer : STEP_SGD,
          static_cast<float>(lr), static_cast<float>(eps),
          static_cast<float>(weight_decay), static_cast<float>(step_lr), b1, b2,
          1.0f - b1, 1.0f - b2,
          static_cast<float>(1.0 - std::pow(static_cast<double>(b1), iteration)),
          static_cast<float>(1.0 - std::pow(static_cast<double>(b2), iteration)),
          learn_step};
}

// Floats per row of optimizer state: Adagrad one accumulator, Adam the moments [m | v].
QEMBED_HD int64_t state_width(int64_t optimizer, int64_t dim) {
  return optimizer == OPT_ADAGRAD ? 1 : (optimizer == OPT_ADAM ? 2 * dim : 0);
}

// The element functions below are templates over T: float here and on the GPU, a vector of
// lanes in the CPU kernels (csrc/cpu/lanes.h: GCC's vector types take + - * / per lane and a
// float operand as a splat), so one expression serves both and rounds the same. Lanes<T>
// gives what operators cannot.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  static QEMBED_HD float splat(float x) { return x; }
  static QEMBED_HD float sqrt(float x) { return sqrtf(x); }
  static QEMBED_HD float nearbyint(float x) { return nearbyintf(x); }
};

// The gradient with weight decay.
template <typename T>
QEMBED_HD T decayed_grad(T w, T g, const UpdateConfig& c) { return g + c.wd * w; }

template <typename T>
QEMBED_HD T sgd_value(T w, T g, const UpdateConfig& c) {
  return w - c.lr * (g + c.wd * w);
}

// Row-wise Adagrad: `acc` is the row's accumulator after adding the mean squared gradient.
QEMBED_HD float adagrad_denom(float acc, const UpdateConfig& c) { return sqrtf(acc) + c.eps; }

template <typename T>
QEMBED_HD T adagrad_value(T w, T g, float denom, const UpdateConfig& c) {
  return w - c.lr * ((g + c.wd * w) / denom);
}

// Adam on one element; m and v are updated in place.
template <typename T>
QEMBED_HD T adam_value(T w, T g, T& m, T& v, const UpdateConfig& c) {
  const T gd = g + c.wd * w;
  m = c.b1 * m + c.omb1 * gd;
  v = c.b2 * v + c.omb2 * (gd * gd);
  return w - c.lr * ((m / c.bc1) / (Lanes<T>::sqrt(v / c.bc2) + c.eps));
}

// LSQ: g * dQ/ds at x = w / s, dQ/ds = Qn below the range, Qp above, round(x) - x inside.
template <typename T>
QEMBED_HD T lsq_term(T w, T g, float s, int32_t qn, int32_t qp) {
  const T lo = Lanes<T>::splat(static_cast<float>(qn)), hi = Lanes<T>::splat(static_cast<float>(qp));
  const T x = w / s;
  const T inside = Lanes<T>::nearbyint(x) - x;
  return g * (x < lo ? lo : (x > hi ? hi : inside));
}

// Sums over a row (Adagrad's mean square, LSQ's step gradient) add in one order on every
// device and in qembed/reference.py (_lane_sum): 16 partial sums, partial j adding the
// elements j, j + 16, j + 32, ... from the left, then the upper half of the partials added
// to the lower half, 16 -> 8 -> 4 -> 2 -> 1. The partials map onto SIMD lanes; a strictly
// left-to-right sum waited on one addition per element.
constexpr int kSumLanes = 16;

// LSQ's gradient scale 1 / sqrt(Qp * n); Qp = 0 at one bit, hence max(Qp, 1).
QEMBED_HD float lsq_scale(int32_t qp, int64_t n) {
  const int64_t q = qp > 1 ? qp : 1;
  return 1.0f / sqrtf(static_cast<float>(q * n));
}

// The next step size from its gradient gs; st holds Adam's [m, v] for this step. A NaN
// passes through the floor as std::max(NaN, floor) lets it.
QEMBED_HD float next_step(float s, float gs, float* st, const UpdateConfig& c) {
  float delta = gs;
  if (c.step_optimizer == STEP_ADAM) {
    st[0] = c.b1 * st[0] + c.omb1 * gs;
    st[1] = c.b2 * st[1] + c.omb2 * (gs * gs);
    delta = (st[0] / c.bc1) / (sqrtf(st[1] / c.bc2) + c.eps);
  }
  const float t = s - c.step_lr * delta;
  return t < kMinStep ? kMinStep : t;
}

}  // namespace qembed
