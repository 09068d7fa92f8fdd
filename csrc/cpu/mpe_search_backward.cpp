// mpe_search_backward: every gradient of the MPE search from one pass over the distinct rows
// a batch read. With g the row's gradient (from embedding_bag_backward), p = probs[g(r)],
// x = (w - beta) / alpha_b and in_b = [Qn <= x <= Qp] (straight-through estimator):
//   dL/dw_d      = sum_b p_b * in_b * g_d
//   dL/dalpha_b  = s_b * sum_{r,d} p_b * g_d * (round(x) - x if in_b, else Qn or Qp)
//   dL/dbeta_d   = sum_b s_b * sum_r p_b * g_d * (1 - in_b)
//   dL/dp_{G,b}  = sum_{r in G} sum_d g_d * Q_b(w)_d
// s_b = 1 / sqrt(max(Qp_b, 1) * numel) is LSQ's gradient scale. 0-bit candidates get zero.
// Per-row partial sums are reduced in row order afterwards, so results do not depend on the
// thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <cmath>
#include <tuple>
#include <vector>
#include "../checks.h"
#include "bags.h"
#include "mpe.h"

namespace qembed {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mpe_search_backward_cpu(
    const at::Tensor& weight_in, const at::Tensor& unique_rows_in, const at::Tensor& grad_rows_in,
    const at::Tensor& row_group_in, const at::Tensor& probs_in, const at::Tensor& alpha_in,
    const at::Tensor& beta_in, c10::IntArrayRef bits, int64_t numel) {
  const char* op = "mpe_search_backward";
  const at::Tensor weight = weight_in.contiguous(), row_group = row_group_in.contiguous();
  const at::Tensor probs = probs_in.contiguous(), alpha = alpha_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  const SearchQuantizer q = search_quantizer(op, weight, row_group, probs, alpha, beta, bits);
  check_search_rows_args(weight, unique_rows_in, grad_rows_in, numel);
  const at::Tensor uniq_t = unique_rows_in.to(at::kLong).contiguous();
  const int64_t u = uniq_t.numel(), dim = q.dim, m = q.num_candidates();
  const int64_t* uniq = uniq_t.data_ptr<int64_t>();
  check_indices_in_range(uniq, u, weight.size(0));
  const at::Tensor grad = grad_rows_in.contiguous();

  at::Tensor grad_w = at::zeros({u, dim}, weight.options());
  at::Tensor grad_alpha = at::zeros({m}, weight.options());
  at::Tensor grad_beta = at::zeros({dim}, weight.options());
  at::Tensor grad_probs = at::zeros({probs.size(0), m}, weight.options());
  std::vector<float> scale(m);
  for (int64_t k = 0; k < m; ++k) scale[k] = lsq_plus_grad_scale(q.bits[k], numel);
  // Per-row partials: [U, m] for alpha and probs, [U, D] for beta.
  std::vector<float> part_alpha(u * m, 0.0f), part_probs(u * m, 0.0f), part_beta(u * dim, 0.0f);
  const float* w_all = weight.data_ptr<float>();
  const float* g_all = grad.data_ptr<float>();
  float* gw_all = grad_w.data_ptr<float>();

  at::parallel_for(0, u, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* w = w_all + uniq[i] * dim;
      const float* g = g_all + i * dim;
      const float* p = q.probs_of(uniq[i]);
      float* gw = gw_all + i * dim;
      float* gb = part_beta.data() + i * dim;
      for (int64_t k = 0; k < m; ++k) {
        const int64_t b = q.bits[k];
        if (b == 0) continue;
        const int32_t lo = qmin(b), hi = qmax(b);
        const float a = q.alpha[k], flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
        float ga = 0.0f, gp = 0.0f;
        for (int64_t d = 0; d < dim; ++d) {
          const float x = (w[d] - q.beta[d]) / a;
          const bool inside = x >= flo && x <= fhi;
          const float value = lsq_plus_value(w[d], q.beta[d], a, lo, hi);
          const float pg = p[k] * g[d];
          gp += g[d] * value;
          if (inside) {
            gw[d] += pg;
            ga += pg * (std::nearbyint(x) - x);
          } else {
            ga += pg * (x < flo ? flo : fhi);
            gb[d] += scale[k] * pg;
          }
        }
        part_alpha[i * m + k] = ga;
        part_probs[i * m + k] = gp;
      }
    }
  });

  float* ga = grad_alpha.data_ptr<float>();
  float* gb = grad_beta.data_ptr<float>();
  float* gp = grad_probs.data_ptr<float>();
  for (int64_t i = 0; i < u; ++i) {
    const int64_t grp = q.row_group[uniq[i]];
    for (int64_t k = 0; k < m; ++k) {
      ga[k] += part_alpha[i * m + k];
      gp[grp * m + k] += part_probs[i * m + k];
    }
    for (int64_t d = 0; d < dim; ++d) gb[d] += part_beta[i * dim + d];
  }
  for (int64_t k = 0; k < m; ++k) ga[k] *= scale[k];
  return {grad_w, grad_alpha, grad_beta, grad_probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("mpe_search_backward", &mpe_search_backward_cpu); }

}  // namespace qembed
