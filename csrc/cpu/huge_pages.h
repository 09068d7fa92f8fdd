// Tables and large op results on transparent huge pages. A lookup reads rows at random from
// the whole table: with 4 KiB pages nearly every row read from a table of hundreds of MB
// misses the TLB and waits on a page walk before its cache lines can even be requested; 2 MiB
// pages leave the walks to a few hundred entries. A large result's fresh memory would fault
// at each 4 KiB page's first write (empty_on_huge_pages, below). Only a hint: where the
// kernel's THP mode is `never` (or on other systems) the memory keeps ordinary pages.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <cstdint>
#include "result_cache.h"
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace qembed {

// A transparent huge page on x86-64 Linux.
constexpr size_t kHugePageBytes = size_t{2} << 20;

// Advises the whole pages inside [data, data + bytes). Takes effect for pages not yet
// touched, so call it on fresh memory, before writing the table.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(page - 1);
  if (end >= begin + kHugePageBytes)  // less holds no huge page: no call
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// at::empty for an op's large result (a batch's lookup output, its row gradients): tens of
// MB for a batch of one id per bag, asked for again every call. Results of 1 MiB and more
// come from result_cache.cpp, on huge pages, reusing the memory of those freed before: fresh
// memory costs a page fault at each page's first write, more than the lookup itself on 4 KiB
// pages (4096 x 26 x 128 fp32, 54 MB: 30 ms against 7 ms on huge pages, 1 thread).
inline at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr int64_t kCachedFrom = int64_t{1} << 20;
  const at::ScalarType dtype = c10::typeMetaToScalarType(options.dtype());
  int64_t bytes = static_cast<int64_t>(c10::elementSize(dtype));
  for (const int64_t s : sizes) bytes *= s;
  if (options.device().is_cpu() && bytes >= kCachedFrom)
    return at::Tensor(at::detail::empty_generic(
        sizes, result_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
        std::nullopt));
  at::Tensor t = at::empty(sizes, options);
  if (t.is_cpu()) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

// at::zeros for a table: the same, with the memory advised before it is first written.
inline at::Tensor zeros_for_table(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_on_huge_pages(sizes, options).zero_();
}

}  // namespace qembed
