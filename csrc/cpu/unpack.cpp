// unpack: bit-packed rows [N, >= code_bytes(D, bits)] -> uint8 codes [N, D].
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include "../checks.h"
#include "../padded_rows.h"

namespace qembed {
namespace {

at::Tensor unpack_cpu(const at::Tensor& packed_in, int64_t bits, int64_t true_dim) {
  check_unpack_args(packed_in, bits, true_dim);
  const int64_t dim = padded_dim(true_dim);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t n = packed.size(0), stride = packed.size(1);
  at::Tensor out = at::empty({n, dim}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  QEMBED_DISPATCH_BITS(bits, [&] {
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t g = 0; g < dim / 8; ++g) {
          const uint64_t x = load_group<BITS>(src + r * stride + g * BITS);
          for (int i = 0; i < 8; ++i) dst[r * dim + g * 8 + i] = group_code<BITS>(x, i);
        }
      }
    });
  });
  return narrow_columns(out, true_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("unpack", &unpack_cpu); }

}  // namespace qembed
