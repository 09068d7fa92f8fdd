// Run-time choice of the CPU kernels' instruction set (csrc/README.md: "CPU kernel variants").
//
// The kernels in cpu/isa/ are compiled once per variant: scalar (the target's baseline,
// x86-64's SSE2), avx2 (x86-64-v3: AVX2, FMA, F16C, BMI1, BMI2, LZCNT, MOVBE) and avx512
// (x86-64-v4: AVX512F, BW, CD, DQ, VL, plus AVX512VBMI, whose byte permute the lookup's
// decoder needs: a Skylake-X, without it, gets avx2). The
// library loads on any x86-64 CPU; when it loads, the best variant the CPU supports is chosen,
// unless QEMBED_CPU_CAPABILITY names a lower one. Off x86-64 there is only the scalar variant.
// The ops call a kernel through QEMBED_CPU_KERNEL(name), which picks the chosen variant's.
//
// Kernels see plain pointers and sizes, never a torch header: whatever inline function such a
// header held would be compiled into each variant under a name the variants share.
#pragma once
#include <string>
#include "../isa_namespace.h"

namespace qembed {
namespace cpu {

enum class Capability : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The variant the kernels run in.
Capability capability();
// Its name in QEMBED_CPU_CAPABILITY and qembed.ops.cpu_capability(): scalar, avx2, avx512.
const char* capability_name(Capability c);
// Whether this build has variant c and this CPU (and its operating system) can run it.
bool supported(Capability c);
// Makes the kernels run in variant `name`; returns "" or why it cannot be (an unknown name,
// one this CPU cannot run).
std::string set_capability(const char* name);
// The choice made when the library loads: QEMBED_CPU_CAPABILITY if set, else the best
// supported variant. Returns "" or what is wrong with the variable.
std::string choose_capability();

template <typename F>
F* select_kernel(F* scalar, F* avx2, F* avx512) {
  switch (capability()) {
    case Capability::kAvx512: return avx512;
    case Capability::kAvx2: return avx2;
    default: return scalar;
  }
}

}  // namespace cpu
}  // namespace qembed

// Inside namespace qembed: declares a kernel in every variant's namespace, e.g.
//   QEMBED_DECLARE_CPU_KERNEL(bool embedding_bag_pool(const LookupArgs& a, ...))
// and QEMBED_CPU_KERNEL(embedding_bag_pool)(args...) calls the chosen variant's.
// setup.py defines QEMBED_X86_KERNELS where it compiles the avx2 and avx512 variants.
#if defined(QEMBED_X86_KERNELS)
#define QEMBED_DECLARE_CPU_KERNEL(...) \
  namespace scalar {                   \
  __VA_ARGS__;                         \
  }                                    \
  namespace avx2 {                     \
  __VA_ARGS__;                         \
  }                                    \
  namespace avx512 {                   \
  __VA_ARGS__;                         \
  }
#define QEMBED_CPU_KERNEL(name)                                                \
  ::qembed::cpu::select_kernel(&::qembed::scalar::name, &::qembed::avx2::name, \
                               &::qembed::avx512::name)
#else
#define QEMBED_DECLARE_CPU_KERNEL(...) \
  namespace scalar {                   \
  __VA_ARGS__;                         \
  }
#define QEMBED_CPU_KERNEL(name) (&::qembed::scalar::name)
#endif
