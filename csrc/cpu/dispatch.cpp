// The CPU kernels' variant: what the CPU supports, what QEMBED_CPU_CAPABILITY asks for.
#include "dispatch.h"
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace qembed {
namespace cpu {
namespace {

constexpr Capability kAll[] = {Capability::kScalar, Capability::kAvx2, Capability::kAvx512};

// Set once when the library loads (qembed.cpp), and by tests through the Python module.
std::atomic<int> chosen{static_cast<int>(Capability::kScalar)};

bool parse(const char* name, Capability* c) {
  for (Capability k : kAll)
    if (std::strcmp(name, capability_name(k)) == 0) {
      *c = k;
      return true;
    }
  return false;
}

#if defined(QEMBED_X86_KERNELS)
// What each variant needs beyond the scalar one, for messages.
const char* requirements(Capability c) {
  switch (c) {
    case Capability::kAvx512: return "x86-64-v4 (AVX512F, BW, CD, DQ, VL) and AVX512VBMI";
    case Capability::kAvx2: return "x86-64-v3 (AVX2, FMA, F16C, BMI1, BMI2, LZCNT, MOVBE)";
    default: return "nothing";
  }
}

std::string supported_names() {
  std::string s;
  for (Capability k : kAll)
    if (supported(k)) s += std::string(s.empty() ? "" : ", ") + capability_name(k);
  return s;
}
#endif

}  // namespace

Capability capability() { return static_cast<Capability>(chosen.load(std::memory_order_relaxed)); }

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAvx512: return "avx512";
    case Capability::kAvx2: return "avx2";
    default: return "scalar";
  }
}

bool supported(Capability c) {
  if (c == Capability::kScalar) return true;
#if defined(QEMBED_X86_KERNELS)
  // libgcc's feature bits count a feature only where the OS saves its registers (XGETBV).
  __builtin_cpu_init();
  if (c == Capability::kAvx2) return __builtin_cpu_supports("x86-64-v3");
  return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

std::string set_capability(const char* name) {
  Capability c;
  if (!parse(name, &c))
    return std::string("'") + name + "' is not a CPU capability (scalar, avx2 or avx512)";
  if (!supported(c)) {
#if defined(QEMBED_X86_KERNELS)
    return std::string(name) + " needs " + requirements(c) + ", which this CPU lacks (it " +
           "supports " + supported_names() + ")";
#else
    return std::string(name) + " is for x86-64 CPUs: this build has the scalar kernels only";
#endif
  }
  chosen.store(static_cast<int>(c), std::memory_order_relaxed);
  return "";
}

std::string choose_capability() {
  const char* request = std::getenv("QEMBED_CPU_CAPABILITY");
  if (request != nullptr && *request != '\0') {
    const std::string error = set_capability(request);
    return error.empty() ? error : "QEMBED_CPU_CAPABILITY: " + error;
  }
  for (Capability c : kAll)
    if (supported(c)) chosen.store(static_cast<int>(c), std::memory_order_relaxed);
  return "";
}

}  // namespace cpu
}  // namespace qembed
