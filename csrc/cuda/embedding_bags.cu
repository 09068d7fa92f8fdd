// embedding_bags: every feature of a batch in one launch, one warp per (feature, bag), each
// bag pooled as the single-table lookup pools it (pool_bag.cuh) at its table's width and
// written straight into its columns of the output. Tables and features are described by a
// small array copied to the device with the call (the tables are a list, not one buffer).
// Bad ids and offsets are skipped on the device as embedding_bag.cu skips them;
// QEMBED_CUDA_VALIDATE=1 waits and raises for them.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <type_traits>
#include <vector>
#include "../checks.h"
#include "launch.cuh"
#include "pool_bag.cuh"

namespace qembed {
namespace {

struct FeatureRef {
  int64_t table, column;
  bool mean;
};

template <typename index_t, typename out_t>
__global__ void bags_kernel(const Table* __restrict__ tables, const int32_t* __restrict__ bits,
                            const FeatureRef* __restrict__ features, int64_t num_features,
                            int64_t batch, const index_t* __restrict__ idx, int64_t n,
                            const int64_t* __restrict__ offsets, const float* __restrict__ psw,
                            int64_t width, int* error, out_t* __restrict__ out) {
  const int64_t item = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  if (item >= num_features * batch) return;  // whole warps leave together
  const int64_t f = item / batch, b = item % batch;
  const FeatureRef feature = features[f];
  const Table t = tables[feature.table];
  int64_t start, end;
  if (bag_range(offsets, num_features * batch + 1, item, n, start, end) && error &&
      threadIdx.x % kWarp == 0)
    atomicOr(error, kBadOffsets);
  out_t* dst = out + b * width + feature.column;
  QEMBED_DISPATCH_BITS(bits[feature.table], [&] {
    using U = Unit<BITS>;
    const int lanes = lanes_per_row((t.dim + U::kCodes - 1) / U::kCodes, U::kPerLane);
    pool_bag_warp<BITS>(t, idx, start, end, psw, feature.mean, lanes, error, dst);
  });
}

at::Tensor embedding_bags_cuda(at::TensorList tables_in, at::TensorList steps,
                               c10::IntArrayRef bits, c10::IntArrayRef dims,
                               c10::IntArrayRef formats, c10::IntArrayRef feature_tables,
                               c10::IntArrayRef feature_columns, c10::IntArrayRef poolings,
                               const at::Tensor& values_in, const at::Tensor& offsets_in,
                               const c10::optional<at::Tensor>& psw_in,
                               at::ScalarType out_dtype) {
  const BagsShape shape = check_bags_args(tables_in, steps, bits, dims, formats, feature_tables,
                                          feature_columns, poolings, values_in, offsets_in,
                                          psw_in, out_dtype);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const int64_t batch = shape.batch_size, width = shape.width;
  const int64_t num_tables = static_cast<int64_t>(tables_in.size());
  const int64_t num_features = static_cast<int64_t>(feature_tables.size());
  at::Tensor out = at::empty({batch, width}, values_in.options().dtype(out_dtype));
  if (batch == 0) return out;
  std::vector<at::Tensor> keep;  // word-aligned tables and their steps, alive for the launch
  // The description of tables and features, in one pinned host buffer copied in one go.
  const int64_t table_bytes = num_tables * sizeof(Table);
  const int64_t bits_bytes = (num_tables * sizeof(int32_t) + 7) / 8 * 8;
  const int64_t feature_bytes = num_features * sizeof(FeatureRef);
  at::Tensor host = at::empty({table_bytes + bits_bytes + feature_bytes},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* table_desc = reinterpret_cast<Table*>(host.data_ptr<uint8_t>());
  auto* bits_desc = reinterpret_cast<int32_t*>(host.data_ptr<uint8_t>() + table_bytes);
  auto* feature_desc =
      reinterpret_cast<FeatureRef*>(host.data_ptr<uint8_t>() + table_bytes + bits_bytes);
  for (int64_t t = 0; t < num_tables; ++t) {
    keep.push_back(word_aligned(tables_in[t]));
    const float* step = nullptr;
    if (formats[t] == SYM_TABLE) {
      keep.push_back(steps[t].contiguous());
      step = keep.back().data_ptr<float>();
    }
    const at::Tensor& rows = keep[keep.size() - (step ? 2 : 1)];
    table_desc[t] = Table{reinterpret_cast<const uint32_t*>(rows.data_ptr<uint8_t>()),
                          rows.size(1) / 4, rows.size(0), dims[t], formats[t], -1, step};
    bits_desc[t] = static_cast<int32_t>(bits[t]);
  }
  for (int64_t f = 0; f < num_features; ++f)
    feature_desc[f] = FeatureRef{feature_tables[f], feature_columns[f], poolings[f] == POOL_MEAN};
  const at::Tensor desc = host.to(values_in.device(), /*non_blocking=*/true);
  const uint8_t* d = desc.data_ptr<uint8_t>();

  const at::Tensor values = values_in.contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  at::Tensor psw;
  if (psw_in.has_value()) psw = psw_in->to(at::kFloat).contiguous();
  const bool validate = validate_on_host();
  const at::Tensor error =
      validate ? at::zeros({1}, values.options().dtype(at::kInt)) : at::Tensor();
  int* err = validate ? error.data_ptr<int>() : nullptr;
  const float* w = psw.defined() ? psw.data_ptr<float>() : nullptr;
  auto launch = [&](auto* idx, auto* dst) {
    using index_t = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
    using out_t = std::remove_pointer_t<decltype(dst)>;
    bags_kernel<index_t, out_t><<<blocks_for(num_features * batch * kWarp), kBlock, 0,
                                  current_stream()>>>(
        reinterpret_cast<const Table*>(d), reinterpret_cast<const int32_t*>(d + table_bytes),
        reinterpret_cast<const FeatureRef*>(d + table_bytes + bits_bytes), num_features, batch,
        idx, values.numel(), offsets.data_ptr<int64_t>(), w, width, err, dst);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto for_output = [&](auto* idx) {
    if (out_dtype == at::kFloat) launch(idx, out.data_ptr<float>());
    else if (out_dtype == at::kHalf) launch(idx, out.data_ptr<at::Half>());
    else launch(idx, out.data_ptr<at::BFloat16>());
  };
  if (values.scalar_type() == at::kInt) for_output(values.data_ptr<int32_t>());
  else for_output(values.data_ptr<int64_t>());
  if (validate) {
    const int flags = error.item<int>();
    TORCH_CHECK_INDEX(!(flags & kBadIndex), "qembed.embedding_bags: an id is outside its table");
    TORCH_CHECK_VALUE(!(flags & kBadOffsets), "qembed.embedding_bags: offsets must start at 0, ",
                      "be non-decreasing and end at the number of values (", values.numel(), ")");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CUDA, m) { m.impl("embedding_bags", &embedding_bags_cuda); }

}  // namespace qembed
