// mpe_search_backward: every gradient of the MPE search from one pass over the distinct rows
// a batch read. With g the row's gradient (from embedding_bag_backward), p = probs[g(r)],
// x = (w - beta) / alpha_b and in_b = [Qn <= x <= Qp] (straight-through estimator):
//   dL/dw_d      = sum_b p_b * in_b * g_d
//   dL/dalpha_b  = s_b * sum_{r,d} p_b * g_d * (round(x) - x if in_b, else Qn or Qp)
//   dL/dbeta_d   = sum_b s_b * sum_r p_b * g_d * (1 - in_b)
//   dL/dp_{G,b}  = sum_{r in G} sum_d g_d * Q_b(w)_d
// s_b = 1 / sqrt(max(Qp_b, 1) * numel) is LSQ's gradient scale. 0-bit candidates get zero.
// Per-row partial sums are reduced in row order afterwards, so results do not depend on the
// thread count. The kernel (isa/mpe_search_backward.cpp) computes the rows' part.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <tuple>
#include <vector>
#include "../checks.h"
#include "../lsq_plus.h"
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
  const int64_t u = uniq_t.numel(), dim = q.dim, m = q.num_candidates;
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
  const SearchBackwardArgs args{q, weight.data_ptr<float>(), uniq, grad.data_ptr<float>(),
                                scale.data(), grad_w.data_ptr<float>(), part_alpha.data(),
                                part_probs.data(), part_beta.data()};
  at::parallel_for(0, u, 16, [&](int64_t begin, int64_t end) {
    QEMBED_CPU_KERNEL(mpe_search_backward_rows)(args, begin, end);
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
