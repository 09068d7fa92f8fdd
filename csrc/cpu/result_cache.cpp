// The memory of large op results (huge_pages.h: empty_on_huge_pages), kept for reuse when
// they are freed. A batch's lookup output or row gradients are tens of MB, asked for again
// every step at nearly the same size; fresh memory for them costs a page fault and the
// kernel's zeroing per page at its first write (54 MB: 9 ms on huge pages, 31 ms on 4 KiB
// pages, against 3-5 ms to write memory already mapped; AMD EPYC, one thread), and glibc
// hands out memory over 32 MB fresh each time. Freed blocks wait here, the most recently
// freed reused first, up to a limit of idle bytes (QEMBED_RESULT_CACHE_MB, 512 by default;
// 0 turns the cache off), beyond which the longest idle are returned to the system.
#include "result_cache.h"
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>
#include "huge_pages.h"

namespace qembed {
namespace {

size_t limit_from_environment() {
  const char* text = std::getenv("QEMBED_RESULT_CACHE_MB");
  if (text == nullptr || *text == '\0') return size_t{512} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && mb >= 0, "qembed: QEMBED_RESULT_CACHE_MB must be a whole "
                    "number of MB (0 turns the cache off), got '", text, "'");
  return static_cast<size_t>(mb) << 20;
}

class ResultCache final : public c10::Allocator {
 public:
  struct Block {
    void* data;
    size_t capacity;
  };

  c10::DataPtr allocate(size_t bytes) override {
    const size_t capacity =
        (std::max<size_t>(bytes, 1) + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    Block* block = take(bytes, capacity);
    if (block == nullptr) {
      void* data = std::aligned_alloc(kHugePageBytes, capacity);
      TORCH_CHECK_WITH(OutOfMemoryError, data != nullptr, "qembed: out of memory allocating ",
                       capacity, " bytes for an op's result");
      advise_huge_pages(data, capacity);
      block = new Block{data, capacity};
    }
    return {block->data, block, &ResultCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

  size_t release_idle(size_t keep) {
    std::lock_guard<std::mutex> lock(mutex_);
    return evict_beyond(keep);
  }

  static ResultCache& instance() {
    // Never destroyed: a result freed after static destruction still finds it.
    static ResultCache* cache = new ResultCache();
    return *cache;
  }

 private:
  ResultCache() : limit_(limit_from_environment()) {}

  // An idle block that holds `bytes` without wasting more than its size again, the most
  // recently freed of the smallest such; null if none.
  Block* take(size_t bytes, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t best = idle_.size();
    for (size_t i = idle_.size(); i-- > 0;) {
      const size_t c = idle_[i]->capacity;
      if (c >= bytes && c <= 2 * capacity && (best == idle_.size() || c < idle_[best]->capacity))
        best = i;
    }
    if (best == idle_.size()) return nullptr;
    Block* block = idle_[best];
    idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(best));
    idle_bytes_ -= block->capacity;
    return block;
  }

  static void give_back(void* context) {
    Block* block = static_cast<Block*>(context);
    ResultCache& cache = instance();
    std::lock_guard<std::mutex> lock(cache.mutex_);
    cache.idle_.push_back(block);
    cache.idle_bytes_ += block->capacity;
    cache.evict_beyond(cache.limit_);
  }

  // Frees the longest idle blocks until at most `keep` idle bytes remain; returns the bytes
  // freed. Called with the mutex held.
  size_t evict_beyond(size_t keep) {
    size_t freed = 0, evicted = 0;
    while (evicted < idle_.size() && idle_bytes_ > keep) {
      Block* block = idle_[evicted++];
      idle_bytes_ -= block->capacity;
      freed += block->capacity;
      std::free(block->data);
      delete block;
    }
    idle_.erase(idle_.begin(), idle_.begin() + static_cast<std::ptrdiff_t>(evicted));
    return freed;
  }

  std::mutex mutex_;
  std::vector<Block*> idle_;  // the longest idle first
  size_t idle_bytes_ = 0;
  const size_t limit_;
};

}  // namespace

c10::Allocator* result_allocator() { return &ResultCache::instance(); }

size_t cached_result_bytes() { return ResultCache::instance().idle_bytes(); }

size_t empty_result_cache() { return ResultCache::instance().release_idle(0); }

}  // namespace qembed
