// The packed-row layout, written once for CPU and CUDA.
//
// A table is a uint8 tensor [R, row_bytes(D, bits, fmt)]. Each row holds
//   [codes: ceil(D/8)*bits bytes][pad to 4 bytes][parameters: param_bytes(fmt)]
// Every 8 codes take exactly `bits` bytes; code i of a group occupies bits
// [(i%8)*bits, (i%8)*bits + bits) of the group read as a little-endian integer.
// Codes are unsigned. Each format turns a code u into a value:
//   SYM_ROW   value = step_r * (u + Qn), fp32 step_r stored inline   (LPT/ALPT)
//   SYM_TABLE value = step   * (u + Qn), one fp32 step outside the rows
//   AFFINE    value = scale_r * u + bias_r, fp32 scale_r, bias_r inline
// with Qn = -2^(bits-1): symmetric codes are stored offset-binary.
// Codes come in whole groups: a row of any D holds padded_dim(D) codes. Those past D are
// pad, written by every encoder as the code of (value - bias) / scale = 0 (u = 0 in affine
// rows, u = -Qn, the value 0, in symmetric ones) and never read into a result: the kernels
// work on the padded width and their entry points (padded_rows.h) narrow outputs to D.
// Parameters sit in the row so a lookup touches one contiguous span of memory.
#pragma once
#include <cstdint>
#include <cstring>
#include "isa_namespace.h"

#if defined(__CUDACC__)
#define QEMBED_HD __host__ __device__ __forceinline__
#else
#define QEMBED_HD inline
#endif

namespace qembed {

enum Format : int64_t { SYM_ROW = 0, SYM_TABLE = 1, AFFINE = 2 };
enum Pooling : int64_t { POOL_SUM = 0, POOL_MEAN = 1, POOL_NONE = 2 };

// A row's affine view: value = scale * (u + offset) + bias. Symmetric formats use
// offset = Qn and bias = 0 so that step * q is computed with a single rounding.
struct RowParams {
  float scale;
  float bias;
  int32_t offset;
};

QEMBED_ISA_BEGIN

QEMBED_HD bool valid_format(int64_t fmt) { return fmt >= SYM_ROW && fmt <= AFFINE; }
QEMBED_HD int64_t padded_dim(int64_t dim) { return (dim + 7) / 8 * 8; }
QEMBED_HD int64_t code_bytes(int64_t dim, int64_t bits) { return padded_dim(dim) / 8 * bits; }
QEMBED_HD int64_t param_offset(int64_t dim, int64_t bits) {
  return (code_bytes(dim, bits) + 3) / 4 * 4;
}
QEMBED_HD int64_t param_bytes(int64_t fmt) {
  return fmt == SYM_ROW ? 4 : (fmt == AFFINE ? 8 : 0);
}
QEMBED_HD int64_t row_bytes(int64_t dim, int64_t bits, int64_t fmt) {
  return param_offset(dim, bits) + param_bytes(fmt);
}
QEMBED_HD int32_t qmin(int64_t bits) { return -(1 << (bits - 1)); }
QEMBED_HD int32_t qmax(int64_t bits) { return (1 << (bits - 1)) - 1; }
QEMBED_HD uint32_t code_mask(int64_t bits) { return (1u << bits) - 1u; }

// Loads a group of 8 codes (exactly `bits` bytes) as a little-endian integer.
template <int BITS>
QEMBED_HD uint64_t load_group(const uint8_t* p) {
  uint64_t x = 0;
#if !defined(__CUDA_ARCH__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  std::memcpy(&x, p, BITS);  // one load where BITS is 1, 2, 4 or 8: GCC kept the bytes apart
#else
#pragma unroll
  for (int i = 0; i < BITS; ++i) x |= static_cast<uint64_t>(p[i]) << (8 * i);
#endif
  return x;
}

template <int BITS>
QEMBED_HD void store_group(uint8_t* p, uint64_t x) {
#pragma unroll
  for (int i = 0; i < BITS; ++i) p[i] = static_cast<uint8_t>(x >> (8 * i));
}

template <int BITS>
QEMBED_HD uint32_t group_code(uint64_t group, int i) {
  return static_cast<uint32_t>(group >> (i * BITS)) & ((1u << BITS) - 1u);
}

QEMBED_HD float read_f32(const uint8_t* p) {
  float v;
  memcpy(&v, p, sizeof(float));
  return v;
}

QEMBED_HD void write_f32(uint8_t* p, float v) { memcpy(p, &v, sizeof(float)); }

QEMBED_HD RowParams row_params(const uint8_t* row, int64_t dim, int64_t bits, int64_t fmt,
                               float table_step) {
  const uint8_t* p = row + param_offset(dim, bits);
  if (fmt == AFFINE) return {read_f32(p), read_f32(p + 4), 0};
  const float step = fmt == SYM_ROW ? read_f32(p) : table_step;
  return {step, 0.0f, qmin(bits)};
}

// Mixed-width tables' row ranges (int32 [num_ranges + 1][2], see checks.h). The last of the
// n ranges from range k on that starts at or before row r (range k does): a branchless
// binary search.
QEMBED_HD int64_t last_range_from(const int32_t* ranges, int64_t k, int64_t n, int64_t r) {
  for (; n > 1;) {
    const int64_t half = n / 2;
    k = ranges[2 * (k + half)] <= r ? k + half : k;
    n -= half;
  }
  return k;
}

// The position of row r in the concatenated segments, or -1 if its range is pruned (r inside
// [0, rows), ranges checked).
QEMBED_HD int64_t range_position(const int32_t* ranges, int64_t num_ranges, int64_t r) {
  const int64_t k = last_range_from(ranges, 0, num_ranges, r);
  const int64_t pos = ranges[2 * k + 1];
  return pos < 0 ? -1 : pos + (r - ranges[2 * k]);
}

QEMBED_ISA_END

// Dispatch a runtime bit width to a template parameter.
#define QEMBED_DISPATCH_BITS(bits, ...)                                   \
  [&] {                                                                   \
    switch (bits) {                                                       \
      case 1: { constexpr int BITS = 1; return __VA_ARGS__(); }           \
      case 2: { constexpr int BITS = 2; return __VA_ARGS__(); }           \
      case 3: { constexpr int BITS = 3; return __VA_ARGS__(); }           \
      case 4: { constexpr int BITS = 4; return __VA_ARGS__(); }           \
      case 5: { constexpr int BITS = 5; return __VA_ARGS__(); }           \
      case 6: { constexpr int BITS = 6; return __VA_ARGS__(); }           \
      case 7: { constexpr int BITS = 7; return __VA_ARGS__(); }           \
      default: { constexpr int BITS = 8; return __VA_ARGS__(); }          \
    }                                                                     \
  }()

}  // namespace qembed
