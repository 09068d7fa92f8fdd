// lowp_update: the fused low-precision training step, one warp per distinct row, one lane
// per group of 8 elements. The arithmetic is the CPU kernel's (optim.h, rounding.h,
// philox.h; nvcc runs with --fmad=false) in the same order, sums over a row included
// (common.cuh's lane_sum), so codes, steps and state equal the CPU's bit for bit.
//
// A row's fp32 values are never stored: each pass over the row recomputes them from the
// codes (or the given weights), the gradient and the old optimizer state, and only the last
// pass writes. Any D works without shared memory, and the per-table step, which moves by
// the sum of every row's LSQ gradient before any row is re-quantized, needs no [U, D]
// buffer, only three launches:
//   PARTIAL  per row: its LSQ sum, or a skip flag; nothing else written
//   reduce   one warp adds the partials in row order (the CPU's and the reference's order),
//            moves the step and keeps {old, new}
//   FINISH   per row: recompute, write state and codes at the new step
// Everything else is one launch (ALL). Rows are processed at their padded width (grad,
// weights and weights_out padded by the entry point, padded_rows.h); the optimizer, its state
// and the sums' divisors cover the D real columns, and the pad is written as the code of
// zero. Skipped rows are counted with an integer atomic into
// the returned tensor; nothing waits for the device. Rows that are out of range or not
// strictly increasing are left alone; QEMBED_CUDA_VALIDATE=1 waits and raises for them.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include "../checks.h"
#include "../padded_rows.h"
#include "../optim.h"
#include "../philox.h"
#include "../rounding.h"
#include "common.cuh"
#include "launch.cuh"

namespace qembed {
namespace {

enum Phase { ALL = 0, PARTIAL = 1, FINISH = 2 };
enum RowFlag : uint8_t { ROW_OK = 0, ROW_NON_FINITE = 1, ROW_BAD = 2 };

struct UpdateArgs {
  uint8_t* table;
  int64_t stride, num_rows, num_unique;
  float* table_step;  // SYM_TABLE
  float* state;
  float* step_state;
  const int64_t* uniq;
  const float* grad;
  const float* weights;  // optional
  float* weights_out;    // optional
  float* partial;        // PARTIAL/FINISH: per-row LSQ sums and flags, the {old, new} step
  uint8_t* flag;
  float* steps;
  unsigned long long* skipped;
  int* error;  // validate mode only
  UpdateConfig c;
  bool stochastic;
  uint64_t seed, counter;
  uint64_t row_offset, quad_offset;  // where the table's rows and elements sit in the key
};

template <int BITS, int PHASE>
__global__ void update_kernel(UpdateArgs a) {
  const int64_t k = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  if (k >= a.num_unique) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const UpdateConfig& c = a.c;
  const int64_t dim = c.dim, width = padded_dim(dim), groups = width / 8;
  const int64_t po = param_offset(dim, BITS);
  const int32_t qn = qmin(BITS), qp = qmax(BITS);
  const float* g = a.grad + k * width;
  const float* given = a.weights != nullptr ? a.weights + k * width : nullptr;
  const int64_t r = a.uniq[k];

  bool bad, ok;
  if (PHASE == FINISH) {
    bad = a.flag[k] == ROW_BAD;
    ok = a.flag[k] == ROW_OK;
  } else {
    bad = r < 0 || r >= a.num_rows || (k > 0 && a.uniq[k - 1] >= r);
    ok = !bad;
    for (int64_t d = lane; ok && d < dim; d += kWarp)
      ok = isfinite(g[d]) && (given == nullptr || isfinite(given[d]));
    ok = __all_sync(kFullMask, ok);
    if (lane == 0) {
      if (bad && a.error != nullptr) atomicOr(a.error, r < 0 || r >= a.num_rows ? kBadIndex : kBadOrder);
      if (!ok && !bad) atomicAdd(a.skipped, 1ull);
      if (PHASE == PARTIAL) a.flag[k] = bad ? ROW_BAD : (ok ? ROW_OK : ROW_NON_FINITE);
    }
  }
  if (!ok) {
    if (PHASE != PARTIAL && !bad && a.weights_out != nullptr)
      for (int64_t d = lane; d < width; d += kWarp)
        a.weights_out[k * width + d] = __int_as_float(0x7fc00000);  // the CPU's quiet NaN
    return;
  }

  uint8_t* row = a.table + r * a.stride;
  const bool per_row = c.fmt == SYM_ROW;
  // The step the row was quantized with; FINISH runs after the reduction moved the table's.
  const float s = per_row ? read_f32(row + po) : (PHASE == FINISH ? a.steps[0] : *a.table_step);
  const RowParams params{s, 0.0f, qn};
  float* st = a.state + r * state_width(c.optimizer, dim);

  // The starting values of group gi: dequantized, or the given weights; zero on the pad.
  auto start_values = [&](int64_t gi, float (&w)[8]) {
    if (given != nullptr) {
#pragma unroll
      for (int i = 0; i < 8; ++i) w[i] = given[gi * 8 + i];
    } else {
      decode_group<BITS>(row, gi, params, w);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (gi * 8 + i >= dim) w[i] = 0.0f;
  };

  float denom = 0.0f, acc = 0.0f;  // Adagrad
  if (c.optimizer == OPT_ADAGRAD) {
    const float sq = lane_sum(groups, lane, [&](int64_t gi, float (&t)[8]) {
      float w[8];
      start_values(gi, w);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float gd = decayed_grad(w[i], g[gi * 8 + i], c);
        t[i] = gd * gd;
      }
    });
    acc = st[0] + sq / static_cast<float>(dim);
    denom = adagrad_denom(acc, c);
  }

  // The updated values of group gi; Adam's new moments go to m and v.
  auto updated_values = [&](int64_t gi, float (&w)[8], float (&m)[8], float (&v)[8]) {
    start_values(gi, w);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t d = gi * 8 + i;
      if (c.optimizer == OPT_SGD) {
        w[i] = sgd_value(w[i], g[d], c);
      } else if (c.optimizer == OPT_ADAGRAD) {
        w[i] = adagrad_value(w[i], g[d], denom, c);
      } else if (c.optimizer == OPT_ADAM && d < dim) {  // the pad has no moments
        m[i] = st[d];
        v[i] = st[dim + d];
        w[i] = adam_value(w[i], g[d], m[i], v[i], c);
      }
    }
  };

  float s_new = s;
  float step_st[2] = {0.0f, 0.0f};
  if (PHASE == FINISH) {
    s_new = a.steps[1];
  } else if (c.learn_step) {
    const float gs = lane_sum(groups, lane, [&](int64_t gi, float (&t)[8]) {
      float w[8], m[8], v[8];
      updated_values(gi, w, m, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) t[i] = lsq_term(w[i], g[gi * 8 + i], s, qn, qp);
    });
    if (PHASE == PARTIAL) {
      if (lane == 0) a.partial[k] = gs;
      return;
    }
    if (c.step_optimizer == STEP_ADAM) {
      step_st[0] = a.step_state[2 * r];
      step_st[1] = a.step_state[2 * r + 1];
    }
    s_new = next_step(s, lsq_scale(qp, dim) * gs, step_st, c);
  }

  for (int64_t gi = lane; gi < groups; gi += kWarp) {
    float w[8], m[8], v[8];
    updated_values(gi, w, m, v);
    float u[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (a.stochastic) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const Philox4 q = sr_block(a.seed, a.counter, a.row_offset + static_cast<uint64_t>(r),
                                   a.quad_offset + 2 * gi + half);
#pragma unroll
        for (int j = 0; j < 4; ++j) u[4 * half + j] = uniform_from_bits(q.v[j]);
      }
    }
    uint32_t codes[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t d = gi * 8 + i;
      if (c.optimizer == OPT_ADAM && d < dim) {
        st[d] = m[i];
        st[dim + d] = v[i];
      }
      if (a.weights_out != nullptr) a.weights_out[k * width + d] = w[i];
      const float x = (w[i] - 0.0f) / s_new;  // encode_row's (w - bias) / scale
      codes[i] = static_cast<uint32_t>(round_to_code(x, u[i], a.stochastic, qn, qp) - qn);
    }
    // Each group is read and written by its own lane only: in place is safe.
    pack_group<BITS>(codes, row + gi * BITS);
  }
  // Values every lane read above (the row's step, the accumulator, the step's state) are
  // written once, after the whole warp is past its reads.
  __syncwarp();
  if (lane != 0) return;
  if (c.optimizer == OPT_ADAGRAD) st[0] = acc;
  if (PHASE == ALL && c.learn_step) {
    if (c.step_optimizer == STEP_ADAM) {
      a.step_state[2 * r] = step_st[0];
      a.step_state[2 * r + 1] = step_st[1];
    }
    write_f32(row + po, s_new);
  }
}

// The per-table step: the partial sums of the rows not skipped, added in row order by one
// warp (32 partials loaded at a time, added one by one after a shuffle), then the step's
// optimizer. steps = {old, new} for FINISH.
__global__ void table_step_kernel(const float* __restrict__ partial,
                                  const uint8_t* __restrict__ flag, int64_t num_unique,
                                  int32_t qp, UpdateConfig c, float* table_step,
                                  float* step_state, float* steps) {
  const int lane = threadIdx.x;
  float gs = 0.0f;
  int64_t live = 0;
  for (int64_t base = 0; base < num_unique; base += kWarp) {
    const int64_t k = base + lane;
    const bool ok = k < num_unique && flag[k] == ROW_OK;
    const float x = ok ? partial[k] : 0.0f;
    const unsigned mask = __ballot_sync(kFullMask, ok);
    live += __popc(mask);
    const int m = num_unique - base < kWarp ? static_cast<int>(num_unique - base) : kWarp;
    for (int t = 0; t < m; ++t) {
      const float y = __shfl_sync(kFullMask, x, t);
      if ((mask >> t) & 1u) gs += y;
    }
  }
  if (lane != 0) return;
  const float s = *table_step;
  float s_new = s;
  if (live > 0) {
    float st[2] = {0.0f, 0.0f};
    if (c.step_optimizer == STEP_ADAM) {
      st[0] = step_state[0];
      st[1] = step_state[1];
    }
    s_new = next_step(s, lsq_scale(qp, live * c.dim) * gs, st, c);
    if (c.step_optimizer == STEP_ADAM) {
      step_state[0] = st[0];
      step_state[1] = st[1];
    }
    *table_step = s_new;
  }
  steps[0] = s;
  steps[1] = s_new;
}

at::Tensor lowp_update_cuda(at::Tensor& rows, const c10::optional<at::Tensor>& step,
                            at::Tensor& state, at::Tensor& step_state,
                            const at::Tensor& unique_rows, const at::Tensor& grad_rows,
                            const c10::optional<at::Tensor>& weights,
                            const c10::optional<at::Tensor>& weights_out, int64_t bits,
                            int64_t dim, int64_t fmt, int64_t optimizer, double lr, double eps,
                            double weight_decay, double beta1, double beta2, int64_t iteration,
                            bool learn_step, int64_t step_optimizer, double step_lr,
                            bool stochastic, int64_t seed, int64_t counter,
                            int64_t row_offset, int64_t column_offset) {
  check_update_args(rows, step, state, step_state, unique_rows, grad_rows.contiguous(), weights,
                    weights_out, bits, dim, fmt, optimizer, iteration, learn_step,
                    step_optimizer, row_offset, column_offset);
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor grad = pad_columns(grad_rows).contiguous();
  at::Tensor weights_padded, weights_out_padded;
  if (weights.has_value()) weights_padded = pad_columns(*weights).contiguous();
  if (weights_out.has_value())
    weights_out_padded = padded_dim(dim) == dim ? *weights_out : pad_columns(*weights_out);
  at::Tensor skipped = at::zeros({}, rows.options().dtype(at::kLong));
  const int64_t u = unique_rows.numel();
  if (u == 0) return skipped;
  const at::Tensor uniq = unique_rows.to(at::kLong).contiguous();
  const bool validate = validate_on_host();
  const at::Tensor error =
      validate ? at::zeros({1}, rows.options().dtype(at::kInt)) : at::Tensor();
  const bool table_learn = learn_step && fmt == SYM_TABLE;
  at::Tensor partial, flag, steps;
  if (table_learn) {
    partial = at::empty({u}, rows.options().dtype(at::kFloat));
    flag = at::empty({u}, rows.options());
    steps = at::empty({2}, rows.options().dtype(at::kFloat));
  }
  UpdateArgs a{rows.data_ptr<uint8_t>(),
               rows.size(1),
               rows.size(0),
               u,
               fmt == SYM_TABLE ? step->data_ptr<float>() : nullptr,
               state.data_ptr<float>(),
               step_state.data_ptr<float>(),
               uniq.data_ptr<int64_t>(),
               grad.data_ptr<float>(),
               weights_padded.defined() ? weights_padded.data_ptr<float>() : nullptr,
               weights_out_padded.defined() ? weights_out_padded.data_ptr<float>() : nullptr,
               table_learn ? partial.data_ptr<float>() : nullptr,
               table_learn ? flag.data_ptr<uint8_t>() : nullptr,
               table_learn ? steps.data_ptr<float>() : nullptr,
               reinterpret_cast<unsigned long long*>(skipped.data_ptr<int64_t>()),
               validate ? error.data_ptr<int>() : nullptr,
               make_update_config(dim, fmt, optimizer, lr, eps, weight_decay, beta1, beta2,
                                  iteration, learn_step, step_optimizer, step_lr),
               stochastic,
               static_cast<uint64_t>(seed),
               static_cast<uint64_t>(counter),
               static_cast<uint64_t>(row_offset),
               static_cast<uint64_t>(column_offset / 4)};
  const cudaStream_t stream = current_stream();
  QEMBED_DISPATCH_BITS(bits, [&] {
    if (!table_learn) {
      update_kernel<BITS, ALL><<<blocks_for(u * kWarp), kBlock, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    update_kernel<BITS, PARTIAL><<<blocks_for(u * kWarp), kBlock, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table_step_kernel<<<1, kWarp, 0, stream>>>(a.partial, a.flag, u, qmax(BITS), a.c,
                                               a.table_step, a.step_state, a.steps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    update_kernel<BITS, FINISH><<<blocks_for(u * kWarp), kBlock, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (weights_out.has_value() && !weights_out_padded.is_same(*weights_out))
    weights_out->copy_(weights_out_padded.narrow(1, 0, dim));
  if (validate) {
    const int flags = error.item<int>();
    TORCH_CHECK_INDEX(!(flags & kBadIndex), "qembed.lowp_update: a row is out of range for a ",
                      "table of ", rows.size(0), " rows");
    TORCH_CHECK_VALUE(!(flags & kBadOrder), "qembed.lowp_update: unique_rows must be strictly ",
                      "increasing (as embedding_bag_backward returns them)");
  }
  return skipped;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("lowp_update", &lowp_update_cuda); }

}  // namespace qembed
