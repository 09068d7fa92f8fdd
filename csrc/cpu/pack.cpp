// pack: uint8 codes [N, D] -> dense bit-packed rows [N, code_bytes(D, bits)].
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include "../checks.h"
#include "../padded_rows.h"
#include "../rounding.h"

namespace qembed {
namespace {

at::Tensor pack_cpu(const at::Tensor& codes_in, int64_t bits) {
  check_pack_args(codes_in, bits);
  const at::Tensor codes = pad_columns(codes_in).contiguous();  // pad codes 0
  const int64_t n = codes.size(0), dim = codes.size(1);
  const uint8_t* src = codes.data_ptr<uint8_t>();
  const uint8_t limit = static_cast<uint8_t>(code_mask(bits));
  for (int64_t i = 0; i < codes.numel(); ++i)
    TORCH_CHECK_VALUE(src[i] <= limit, "qembed.pack: code ", int(src[i]), " does not fit in ",
                      bits, " bits");
  at::Tensor out = at::empty({n, code_bytes(dim, bits)}, codes.options());
  uint8_t* dst = out.data_ptr<uint8_t>();
  QEMBED_DISPATCH_BITS(bits, [&] {
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      uint32_t group[8];
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t g = 0; g < dim / 8; ++g) {
          for (int i = 0; i < 8; ++i) group[i] = src[r * dim + g * 8 + i];
          pack_group<BITS>(group, dst + r * code_bytes(dim, BITS) + g * BITS);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qembed, CPU, m) { m.impl("pack", &pack_cpu); }

}  // namespace qembed
