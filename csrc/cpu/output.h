// Lookup results written in the op's output_dtype: fp32, fp16 or bf16, each rounded from fp32
// to nearest even as torch rounds them (c10::Half, c10::BFloat16). Written out here because the
// kernels in cpu/isa/ include no torch header (dispatch.h says why).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include "../isa_namespace.h"

namespace qembed {

enum class OutputType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

QEMBED_ISA_BEGIN

inline uint32_t float_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}

// fp16: NaN -> a quiet NaN of the same sign, beyond 65504 (from its midpoint with 65536 on)
// -> infinity.
inline uint16_t half_from_float(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t mag = x & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return sign | 0x7E00u;
  if (mag >= 0x477FF000u) return sign | 0x7C00u;
  if (mag >= 0x38800000u) {  // a normal fp16 (>= 2^-14): rebias the exponent, round 13 bits off
    const uint32_t m = mag - 0x38000000u;
    return sign | static_cast<uint16_t>((m + 0xFFFu + ((m >> 13) & 1u)) >> 13);
  }
  // Subnormal or zero: in [0.5, 1) the float's last bit weighs 2^-24, fp16's subnormal unit, so
  // adding 0.5 rounds |f| to that unit, and its bits above 0.5's count the units.
  float magnitude;
  std::memcpy(&magnitude, &mag, sizeof magnitude);
  return sign | static_cast<uint16_t>(float_bits(magnitude + 0.5f) - 0x3F000000u);
}

// bf16: NaN -> 0x7FC0, as c10::BFloat16.
inline uint16_t bfloat16_from_float(float f) {
  if (f != f) return 0x7FC0u;
  const uint32_t x = float_bits(f);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// out[i] = v in the output's type: out points to float for kFloat, to 16-bit words otherwise.
template <OutputType T>
inline void store_output(void* out, int64_t i, float v) {
  if constexpr (T == OutputType::kFloat) static_cast<float*>(out)[i] = v;
  else if constexpr (T == OutputType::kHalf) static_cast<uint16_t*>(out)[i] = half_from_float(v);
  else static_cast<uint16_t*>(out)[i] = bfloat16_from_float(v);
}

// Calls f(std::integral_constant<OutputType, t>) for a type known at run time.
template <typename F>
inline auto with_output_type(OutputType t, F&& f) {
  switch (t) {
    case OutputType::kHalf: return f(std::integral_constant<OutputType, OutputType::kHalf>());
    case OutputType::kBFloat16:
      return f(std::integral_constant<OutputType, OutputType::kBFloat16>());
    default: return f(std::integral_constant<OutputType, OutputType::kFloat>());
  }
}

QEMBED_ISA_END
}  // namespace qembed
