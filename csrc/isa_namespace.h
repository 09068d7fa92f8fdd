// The namespace of a CPU kernel variant. The kernels in cpu/isa/ are compiled once per
// instruction set, with QEMBED_ISA defined as the variant's name (scalar, avx2, avx512; see
// cpu/dispatch.h). Every function such a translation unit defines, its own and the inline
// ones of the headers it includes, then lies in qembed::<variant>: an out-of-line copy built
// for AVX-512 has a name of its own, so the linker can never keep it for a caller in another
// variant or in the rest of the library, which would crash on a CPU without AVX-512.
// Headers shared with those kernels put their functions between QEMBED_ISA_BEGIN and
// QEMBED_ISA_END. Types stay outside: they are not code, and the kernels' interfaces use
// them. Elsewhere (the ops, CUDA) both macros are empty.
#pragma once

#if defined(QEMBED_ISA)
namespace qembed {
inline namespace QEMBED_ISA {}  // declared inline before anything reopens it
}  // namespace qembed
#define QEMBED_ISA_BEGIN inline namespace QEMBED_ISA {
#define QEMBED_ISA_END }
#else
#define QEMBED_ISA_BEGIN
#define QEMBED_ISA_END
#endif

// For the kernels' small helpers that run once per row: out of line, the accumulators'
// registers go through memory on every call, and GCC drops a helper's prefetches.
#define QEMBED_INLINE inline __attribute__((always_inline))
