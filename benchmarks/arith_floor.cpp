// The training update's fixed arithmetic on this CPU, alone: the stochastic-rounding uniforms
// of a row (SPEC.md's Philox4x32-10 stream, the SIMD generator of csrc/cpu/sr_uniforms.h)
// and the update's IEEE fp32 divisions (three per value: Adagrad's g / denom, LSQ's w / s,
// re-quantization's w / s). Neither can be replaced without changing result bits, so together
// with the forward lookup they bound how close a training step can come to the lookup's time
// (bench_update_floor.py measures the rest). One thread; best of 7 runs of 2M rows each.
//
//   g++ -O3 -march=native -std=c++17 -DQEMBED_ISA=native -Icsrc -o /tmp/arith_floor
//       benchmarks/arith_floor.cpp && /tmp/arith_floor > benchmarks/results/arith_floor.md
//
// -march=native picks the instruction set the library's dispatch would choose here (AVX-512
// where the CPU has it, AVX2 otherwise).
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <string>
#include "cpu/sr_uniforms.h"

namespace {

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

constexpr int64_t kRows = 2000000;
constexpr int kRuns = 7;

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
Vec splat(float x) { return _mm512_set1_ps(x); }
Vec divide_step(Vec a, Vec c, Vec d) { return _mm512_div_ps(_mm512_add_ps(a, c), d); }
#else
using Vec = __m256;
constexpr int kLanes = 8;
Vec splat(float x) { return _mm256_set1_ps(x); }
Vec divide_step(Vec a, Vec c, Vec d) { return _mm256_div_ps(_mm256_add_ps(a, c), d); }
#endif

// ns a row of `dim` values for its uniforms (with PHILOX), its 3 * dim divisions in
// independent chains of full vectors (with DIVIDE), or both in one loop: the two use
// different units, so together they cost less than their sum.
template <bool PHILOX, bool DIVIDE>
double row_ns(int64_t dim, float& sink) {
  constexpr int kMaxChains = 3 * 128 / kLanes;
  const int chains = static_cast<int>(3 * dim / kLanes);
  alignas(64) float u[128];
  Vec acc[kMaxChains];
  for (int i = 0; i < kMaxChains; ++i) acc[i] = splat(1.0f + i);
  const Vec c = splat(0.5f), d = splat(1.0000001f);
  double best = 1e30;
  for (int run = 0; run < kRuns; ++run) {
    const double t0 = seconds();
    for (int64_t r = 0; r < kRows; ++r) {
      if constexpr (PHILOX) {
        qembed::sr_uniforms(7, 3, static_cast<uint64_t>(r), 0, dim, u);
        sink += u[r & (dim - 1)];
      }
      if constexpr (DIVIDE)
        for (int i = 0; i < chains; ++i) acc[i] = divide_step(acc[i], c, d);
    }
    best = std::min(best, (seconds() - t0) / kRows * 1e9);
  }
  for (int i = 0; i < kMaxChains; ++i) sink += acc[i][0];
  return best;
}

}  // namespace

int main() {
  float sink = 0.0f;
#if defined(__AVX512F__)
  const char* isa = "avx512";
#elif defined(__AVX2__)
  const char* isa = "avx2";
#else
  const char* isa = "scalar";
#endif
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M", std::gmtime(&now));
  std::printf("# The update's fixed arithmetic per row\n\ndevice: %s, 1 thread, %s; date: %s "
              "UTC; command: see benchmarks/arith_floor.cpp's opening comment\n\n",
              cpu_model().c_str(), isa, date);
  std::printf("| dim | Philox uniforms ns | 3 divisions a value ns | both in one loop ns |\n");
  std::printf("|---:|---:|---:|---:|\n");
  for (int64_t dim : {64, 128}) {
    const double philox = row_ns<true, false>(dim, sink);
    const double divisions = row_ns<false, true>(dim, sink);
    std::printf("| %lld | %.1f | %.1f | %.1f |\n", static_cast<long long>(dim), philox,
                divisions, row_ns<true, true>(dim, sink));
  }
  return sink == 12345.0f;  // keeps the results live
}
