// Reuse of large op results' memory (result_cache.cpp says why and how).
#pragma once
#include <c10/core/Allocator.h>
#include <cstddef>

namespace qembed {

// Allocates on huge pages and keeps freed memory for the next result of about its size.
c10::Allocator* result_allocator();
// Bytes freed by results and held for reuse.
size_t cached_result_bytes();
// Returns every held block to the system; the bytes released.
size_t empty_result_cache();

}  // namespace qembed
