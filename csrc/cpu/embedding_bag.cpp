// embedding_bag: fused gather-dequantize-pool over packed rows. The op checks its arguments
// and splits the bags over threads; the kernels (isa/embedding_bag.cpp) read the rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <vector>
#include "../checks.h"
#include "../padded_rows.h"
#include "bags.h"
#include "huge_pages.h"
#include "isa/embedding_bag.h"

namespace qembed {
namespace {

at::Tensor embedding_bag_cpu(const at::Tensor& rows_in, const at::Tensor& indices_in,
                             const at::Tensor& offsets_in,
                             const c10::optional<at::Tensor>& psw_in,
                             const c10::optional<at::Tensor>& step, int64_t bits,
                             int64_t true_dim, int64_t fmt, int64_t mode,
                             bool include_last_offset, int64_t padding_idx,
                             at::ScalarType out_dtype) {
  const int64_t num_out = check_lookup_args(rows_in, indices_in, offsets_in, psw_in, step, bits,
                                            true_dim, fmt, mode, include_last_offset, out_dtype);
  const int64_t dim = padded_dim(true_dim);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = indices.numel(), num_rows = rows.size(0), stride = rows.size(1);
  const float table_step = fmt == SYM_TABLE ? step->item<float>() : 0.0f;
  at::Tensor psw_t;
  if (psw_in.has_value()) psw_t = psw_in->to(at::kFloat).contiguous();
  const float* psw = psw_t.defined() ? psw_t.data_ptr<float>() : nullptr;
  at::Tensor out = empty_on_huge_pages({num_out, dim}, rows.options().dtype(out_dtype));

  const bool int64_indices = indices.scalar_type() == at::kLong;
  std::vector<int64_t> starts;
  if (mode != POOL_NONE) {
    const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
    starts = bag_bounds(offsets.data_ptr<int64_t>(), offsets.numel(), num_out, n);
  }
  const LookupArgs args{rows.data_ptr<uint8_t>(), num_rows, stride, indices.data_ptr(),
                        int64_indices, starts.data(), psw, bits, dim, fmt, table_step,
                        mode == POOL_MEAN, padding_idx, out.data_ptr(), output_type(out_dtype)};
  std::atomic<bool> all_valid{true};
  auto run = [&](auto* kernel, int64_t count, int64_t grain) {
    at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(dim);
      if (!kernel(args, begin, end, scratch.data())) all_valid = false;
    });
  };
  if (mode != POOL_NONE)
    run(QEMBED_CPU_KERNEL(embedding_bag_pool), num_out,
        std::max<int64_t>(1, 4096 / (1 + starts.back() / std::max<int64_t>(1, num_out))));
  else
    run(QEMBED_CPU_KERNEL(embedding_bag_rows), n, 256);
  bool valid = all_valid;
  // Positions after the last bag are not read, but are checked all the same.
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "qembed_embedding_bag", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    for (int64_t p = starts.empty() ? n : starts.back(); p < n && valid; ++p)
      valid = idx[p] >= 0 && idx[p] < num_rows;
    // The lookup skipped the bad rows; find the first one for the message.
    if (!valid) check_indices_in_range(idx, n, num_rows);
  });
  return narrow_columns(out, true_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("embedding_bag", &embedding_bag_cpu); }

}  // namespace qembed
