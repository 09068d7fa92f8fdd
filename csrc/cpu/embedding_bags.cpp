// embedding_bags: every feature of a batch in one lookup (TorchRec's KeyedJaggedTensor
// layout). The batch is cut into chunks of consecutive bags, about kChunkPositions values of
// all features each, dealt to the threads in turn: every thread gets a share of every
// table, so small and large tables share the threads evenly. Within a chunk the features
// go one after another, each pooled as the single-table lookup pools it (pool_bag.h) and
// written straight into its block of the chunk's output rows; the next feature's first
// rows are prefetched before the current one's are read; a large fp32 output is written with
// streaming stores. The op checks its arguments and deals the chunks; the kernel
// (isa/embedding_bags.cpp) pools them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <vector>
#include "../checks.h"
#include "bags.h"
#include "huge_pages.h"
#include "isa/embedding_bags.h"

namespace qembed {
namespace {

// Values per chunk: enough to keep the prefetches ahead of the reads, few enough that the
// chunk's output rows stay in cache and in the TLB while every feature writes its block of
// them (a chunk per feature, writing one block of every output row, missed the TLB on each
// row of a wide output).
constexpr int64_t kChunkPositions = 2048;
// ... but at least this many values of each feature in a row: a run's first rows wait for
// the prefetches to get ahead, and every run pays for its dispatch (with 20 ids a bag, runs
// of 2048 values took 0.8-0.9x the time of runs of 256) ...
constexpr int64_t kRunPositions = 2048;
// ... and at most this many bags (one id a feature: 256 bags, 3.4 MB of 26 x 128 floats;
// 2048 bags took 1.2-1.4x their time).
constexpr int64_t kChunkBags = 256;

// Outputs from this size on are written with streaming stores (BagsLookupArgs): larger than
// a core's share of the last-level cache, they would be read from memory before being
// written and leave the cache before their reader comes. Smaller ones stay cached for it.
constexpr int64_t kStreamOutputFrom = int64_t{16} << 20;

struct Chunk {
  int64_t first_bag, end_bag;
};

// Runs of consecutive bags of about kChunkPositions values over all features (or
// kRunPositions per feature, or kChunkBags bags), at least one per thread.
std::vector<Chunk> make_chunks(int64_t num_values, int64_t num_features, int64_t batch,
                               int64_t threads) {
  std::vector<Chunk> chunks;
  if (batch == 0) return chunks;
  const int64_t per_bag = std::max<int64_t>(1, num_values / batch);
  const int64_t per_feature_bag = std::max<int64_t>(1, per_bag / num_features);
  int64_t bags = std::max({int64_t{1}, kChunkPositions / per_bag, kRunPositions / per_feature_bag});
  bags = std::min({bags, kChunkBags, (batch + threads - 1) / threads});
  for (int64_t b = 0; b < batch; b += bags) chunks.push_back({b, std::min(batch, b + bags)});
  return chunks;
}

at::Tensor embedding_bags_cpu(at::TensorList tables_in, at::TensorList steps,
                              c10::IntArrayRef bits, c10::IntArrayRef dims,
                              c10::IntArrayRef formats, c10::IntArrayRef feature_tables,
                              c10::IntArrayRef feature_columns, c10::IntArrayRef poolings,
                              const at::Tensor& values_in, const at::Tensor& offsets_in,
                              const c10::optional<at::Tensor>& psw_in,
                              at::ScalarType out_dtype) {
  const BagsShape shape = check_bags_args(tables_in, steps, bits, dims, formats, feature_tables,
                                          feature_columns, poolings, values_in, offsets_in,
                                          psw_in, out_dtype);
  const int64_t batch = shape.batch_size, width = shape.width;
  const int64_t num_features = static_cast<int64_t>(feature_tables.size());
  std::vector<at::Tensor> keep;  // contiguous copies, alive for the lookup
  std::vector<BagsTable> tables;
  for (size_t t = 0; t < tables_in.size(); ++t) {
    keep.push_back(tables_in[t].contiguous());
    tables.push_back({keep.back().data_ptr<uint8_t>(), keep.back().size(0), keep.back().size(1),
                      dims[t], bits[t], formats[t],
                      formats[t] == SYM_TABLE ? steps[t].item<float>() : 0.0f});
  }
  const at::Tensor values = values_in.contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_bags_offsets_values("qembed.embedding_bags: ", off, offsets.numel(),
                            std::max<int64_t>(batch, 1), values.numel());
  at::Tensor psw_t;
  if (psw_in.has_value()) psw_t = psw_in->to(at::kFloat).contiguous();
  const float* psw = psw_t.defined() ? psw_t.data_ptr<float>() : nullptr;
  at::Tensor out = empty_on_huge_pages({batch, width}, values.options().dtype(out_dtype));
  int64_t max_dim = 0;
  for (const int64_t d : dims) max_dim = std::max(max_dim, d);

  const int64_t threads = at::get_num_threads();
  const std::vector<Chunk> chunks = make_chunks(values.numel(), num_features, batch, threads);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const bool int64_values = values.scalar_type() == at::kLong;
  bool stream_output = out_dtype == at::kFloat && out.nbytes() >= kStreamOutputFrom &&
                       width % 8 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 32 == 0;
  for (const int64_t d : dims) stream_output = stream_output && d % 8 == 0;
  const BagsLookupArgs args{tables.data(), values.data_ptr(), int64_values, off, batch,
                            num_features, feature_tables.data(), feature_columns.data(),
                            poolings.data(), psw, width, out.data_ptr(), output_type(out_dtype),
                            stream_output};
  std::atomic<bool> all_valid{true};
  at::parallel_for(0, std::min(threads, num_chunks), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(padded_dim(max_dim));
    bool valid = true;
    for (int64_t tid = begin; tid < end; ++tid)
      for (int64_t c = tid; c < num_chunks; c += threads)
        valid = QEMBED_CPU_KERNEL(embedding_bags_chunk)(args, chunks[c].first_bag,
                                                        chunks[c].end_bag, acc.data()) &&
                valid;
    if (!valid) all_valid = false;
  });
  if (!all_valid) {  // an id was out of range and skipped: name it
    std::vector<int64_t> num_rows;
    for (const BagsTable& t : tables) num_rows.push_back(t.num_rows);
    AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "qembed_embedding_bags", [&] {
      check_bags_ids_values("qembed.embedding_bags: ", values.data_ptr<index_t>(), off, batch,
                            feature_tables, num_rows);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("embedding_bags", &embedding_bags_cpu); }

}  // namespace qembed
