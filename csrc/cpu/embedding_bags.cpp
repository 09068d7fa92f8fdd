// embedding_bags: every feature of a batch in one lookup (TorchRec's KeyedJaggedTensor
// layout). The batch is cut into chunks of consecutive bags, about kChunkPositions values of
// all features each, dealt to the threads in turn: every thread gets a share of every
// table, so small and large tables share the threads evenly. Within a chunk the features
// go one after another, each pooled as the single-table lookup pools it (pool_bag.h) and
// written straight into its block of the chunk's output rows; the next feature's first
// rows are prefetched before the current one's are read.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>
#include "../checks.h"
#include "bags.h"
#include "huge_pages.h"
#include "pool_bag.h"
#include "row_codec.h"

namespace qembed {
namespace {

// Values per chunk: enough to keep the prefetches ahead of the reads, few enough that the
// chunk's output rows stay in cache and in the TLB while every feature writes its block of
// them (a chunk per feature, writing one block of every output row, missed the TLB on each
// row of a wide output).
constexpr int64_t kChunkPositions = 2048;
// ... but at least this many values of each feature in a row: a run's first rows wait for
// the prefetches to get ahead, and every run pays for its dispatch.
constexpr int64_t kRunPositions = 256;

struct TableRef {
  const uint8_t* rows;
  int64_t num_rows, stride, dim, bits, fmt;
  float step;
};

struct Chunk {
  int64_t first_bag, end_bag;
};

// Prefetches the rows of the first kPrefetchDistance positions from p: pool_bag prefetches
// that far ahead of the row it reads, so these are the rows it would find missing.
template <typename index_t>
void prefetch_first_rows(const TableRef& t, const index_t* idx, int64_t p, int64_t end) {
  const RowPrefetch prefetch(t.stride);
  for (int64_t q = p; q < std::min(p + kPrefetchDistance, end); ++q)
    prefetch(t.rows + static_cast<int64_t>(idx[q]) * t.stride);  // a wild index never faults
}

// Pools bags [b0, b1) of one feature (`off`: its B + 1 offsets) into out + b * width;
// returns false if an index was out of range (its rows were skipped).
template <int BITS, int64_t FMT, typename index_t, typename out_t>
bool pool_chunk(const TableRef& t, const index_t* idx, const int64_t* off, int64_t b0,
                int64_t b1, const float* psw, bool mean, int64_t width, out_t* out,
                float* acc) {
  const int64_t last = off[b1];
  bool valid = true;
  for (int64_t b = b0; b < b1; ++b) {
    const BagSum bag = pool_bag<BITS, FMT>(t.rows, t.num_rows, t.stride, idx, off[b],
                                           off[b + 1], last, psw, t.dim, t.step, -1, acc);
    valid = valid && !bag.bad_index;
    const float factor = (mean && bag.count > 0) ? 1.0f / static_cast<float>(bag.count) : 1.0f;
    store_row(acc, bag.shift, t.dim, factor, out + b * width);
  }
  return valid;
}

template <typename index_t, typename out_t>
bool pool_chunk_any(const TableRef& t, const index_t* idx, const int64_t* off, int64_t b0,
                    int64_t b1, const float* psw, bool mean, int64_t width, out_t* out,
                    float* acc) {
  return QEMBED_DISPATCH_BITS(t.bits, [&] {
    if (t.fmt == SYM_ROW)
      return pool_chunk<BITS, SYM_ROW>(t, idx, off, b0, b1, psw, mean, width, out, acc);
    if (t.fmt == SYM_TABLE)
      return pool_chunk<BITS, SYM_TABLE>(t, idx, off, b0, b1, psw, mean, width, out, acc);
    return pool_chunk<BITS, AFFINE>(t, idx, off, b0, b1, psw, mean, width, out, acc);
  });
}

// Runs of consecutive bags of about kChunkPositions values over all features (or
// kRunPositions per feature), at least one per thread.
std::vector<Chunk> make_chunks(int64_t num_values, int64_t num_features, int64_t batch,
                               int64_t threads) {
  std::vector<Chunk> chunks;
  if (batch == 0) return chunks;
  const int64_t per_bag = std::max<int64_t>(1, num_values / batch);
  const int64_t per_feature_bag = std::max<int64_t>(1, per_bag / num_features);
  int64_t bags = std::max({int64_t{1}, kChunkPositions / per_bag, kRunPositions / per_feature_bag});
  bags = std::min(bags, (batch + threads - 1) / threads);
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
  std::vector<TableRef> tables;
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
  at::Tensor out = at::empty({batch, width}, values.options().dtype(out_dtype));
  // A batch's output is tens of MB (4096 x 26 x 128 fp32: 54 MB), fresh memory each call:
  // on 4 KiB pages its first writes cost more than the lookup (a fault per page; 30 ms for
  // 54 MB against 7 ms on huge pages, 1 thread, loaded machine).
  advise_huge_pages(out.data_ptr(), out.nbytes());
  int64_t max_dim = 0;
  for (const int64_t d : dims) max_dim = std::max(max_dim, d);

  const int64_t threads = at::get_num_threads();
  const std::vector<Chunk> chunks = make_chunks(values.numel(), num_features, batch, threads);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "qembed_embedding_bags", [&] {
    const index_t* idx = values.data_ptr<index_t>();
    auto first_rows = [&](int64_t f, const Chunk& ch) {
      prefetch_first_rows(tables[feature_tables[f]], idx, off[f * batch + ch.first_bag],
                          off[f * batch + ch.end_bag]);
    };
    auto run = [&](auto* dst) {
      std::atomic<bool> all_valid{true};
      at::parallel_for(0, std::min(threads, num_chunks), 1, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(max_dim);
        bool valid = true;
        for (int64_t tid = begin; tid < end; ++tid) {
          for (int64_t c = tid; c < num_chunks; c += threads) {
            const Chunk& ch = chunks[c];
            first_rows(0, ch);
            for (int64_t f = 0; f < num_features; ++f) {
              if (f + 1 < num_features) first_rows(f + 1, ch);
              valid = pool_chunk_any(tables[feature_tables[f]], idx, off + f * batch,
                                     ch.first_bag, ch.end_bag, psw,
                                     poolings[f] == POOL_MEAN, width,
                                     dst + feature_columns[f], acc.data()) &&
                      valid;
            }
          }
        }
        if (!valid) all_valid = false;
      });
      return all_valid.load();
    };
    bool valid;
    if (out_dtype == at::kFloat) valid = run(out.data_ptr<float>());
    else if (out_dtype == at::kHalf) valid = run(out.data_ptr<at::Half>());
    else valid = run(out.data_ptr<at::BFloat16>());
    if (!valid) {  // an id was out of range and skipped: name it
      std::vector<int64_t> num_rows;
      for (const TableRef& t : tables) num_rows.push_back(t.num_rows);
      check_bags_ids_values("qembed.embedding_bags: ", idx, off, batch, feature_tables,
                            num_rows);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("embedding_bags", &embedding_bags_cpu); }

}  // namespace qembed
