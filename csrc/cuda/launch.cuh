// What the CUDA entry points share: the stream, grid sizes, the debug-mode switch.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cstdlib>

namespace qembed {

constexpr int kBlock = 256;
constexpr int kWarp = 32;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline unsigned int blocks_for(int64_t threads) {
  return static_cast<unsigned int>((threads + kBlock - 1) / kBlock);
}

// QEMBED_CUDA_VALIDATE=1 makes the lookup wait for its kernel and raise on the bad indices
// or offsets it met; otherwise they are skipped on the device without a synchronisation.
inline bool validate_on_host() {
  const char* v = std::getenv("QEMBED_CUDA_VALIDATE");
  return v != nullptr && v[0] == '1';
}

// The kernels read packed rows as 4-byte words; a view can start anywhere in its storage.
inline at::Tensor word_aligned(const at::Tensor& rows) {
  at::Tensor c = rows.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 4 == 0 ? c : c.clone();
}

}  // namespace qembed
