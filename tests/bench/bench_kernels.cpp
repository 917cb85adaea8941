// Single-thread CPU kernel throughput (Google Benchmark; built with -DKTUNE_BENCHMARKS=ON).
// Decode is a matrix-vector product that must stream weights at memory speed, so the figure of
// merit is weight GB/s of matvec_rows: Q4_0 / Q8_0 over a 2048 × (768·8) matrix (eight
// Qwen3-30B-A3B expert gate projections), per ISA. "copies" rotates over that many matrices:
// 1 copy (7 MB) stays in a large L3, 40 copies (283 MB of Q4_0) come from DRAM.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/quant.h"

namespace {

using ktune::QuantType;
using ktune::cpu::Isa;

constexpr int64_t kN = 2048;
constexpr int64_t kRows = 768 * 8;

std::vector<uint8_t> random_matrix(QuantType t, int64_t rows, int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> row(static_cast<size_t>(n));
  const int64_t rb = ktune::row_bytes(t, n);
  std::vector<uint8_t> W(static_cast<size_t>(rows * rb));
  for (int64_t r = 0; r < rows; ++r) {
    for (float& v : row) v = dist(rng);
    ktune::quantize_row(t, row.data(), W.data() + r * rb, n);
  }
  return W;
}

bool skip_if_unavailable(benchmark::State& state, Isa isa) {
  for (Isa a : ktune::cpu::available_isas()) {
    if (a == isa) return false;
  }
  state.SkipWithError("ISA not available on this CPU");
  return true;
}

void BM_Matvec(benchmark::State& state, QuantType t) {
  const Isa isa = static_cast<Isa>(state.range(0));
  const int64_t copies = state.range(1);
  if (skip_if_unavailable(state, isa)) return;
  const int64_t rb = ktune::row_bytes(t, kN);
  std::vector<uint8_t> W = random_matrix(t, kRows, kN, 1);
  W.resize(static_cast<size_t>(copies * kRows * rb));
  for (int64_t c = 1; c < copies; ++c) {
    std::copy(W.begin(), W.begin() + kRows * rb, W.begin() + c * kRows * rb);
  }
  std::vector<float> x(kN);
  std::mt19937 rng(2);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (float& v : x) v = dist(rng);
  std::vector<uint8_t> act(static_cast<size_t>(ktune::row_bytes(QuantType::Q8_0, kN)));
  ktune::cpu::quantize_activation(t, x.data(), act.data(), kN, isa);
  std::vector<float> y(kRows);
  int64_t c = 0;
  for (auto _ : state) {
    ktune::cpu::matvec_rows(t, isa, W.data() + c * kRows * rb, kN, 0, kRows, act.data(), y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    c = (c + 1) % copies;
  }
  state.SetBytesProcessed(state.iterations() * kRows * rb);
  state.SetLabel(std::string(ktune::cpu::isa_name(isa)) + (copies > 1 ? " dram" : " cache"));
}

// Prefill tile: 8 tokens at once; items = weight-row × token dot products.
void BM_Matmul8(benchmark::State& state, QuantType t) {
  const Isa isa = static_cast<Isa>(state.range(0));
  if (skip_if_unavailable(state, isa)) return;
  constexpr int64_t kT = 8;
  const std::vector<uint8_t> W = random_matrix(t, kRows, kN, 1);
  const int64_t ab = ktune::row_bytes(QuantType::Q8_0, kN);
  std::vector<uint8_t> act(static_cast<size_t>(kT * ab));
  std::vector<float> x(kN);
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t i = 0; i < kT; ++i) {
    for (float& v : x) v = dist(rng);
    ktune::cpu::quantize_activation(t, x.data(), act.data() + i * ab, kN, isa);
  }
  std::vector<float> Y(static_cast<size_t>(kT * kRows));
  for (auto _ : state) {
    ktune::cpu::matmul_rows(t, isa, W.data(), kN, 0, kRows, act.data(), ab, kT, Y.data(), kRows);
    benchmark::DoNotOptimize(Y.data());
  }
  state.SetItemsProcessed(state.iterations() * kRows * kT);
  state.SetBytesProcessed(state.iterations() * kRows * ktune::row_bytes(t, kN));
  state.SetLabel(ktune::cpu::isa_name(isa));
}

// Prefill matmul_rows of a rows × 2048 matrix against T tokens (MoE expert: 768 × 32; attention
// projection: 4096 × 64), single thread. Items = multiply-accumulates (rows · n · T): GMAC/s is
// items_per_second / 1e9.
void BM_MatmulRows(benchmark::State& state, QuantType t) {
  const Isa isa = static_cast<Isa>(state.range(0));
  const int64_t rows = state.range(1);
  const int64_t T = state.range(2);
  if (skip_if_unavailable(state, isa)) return;
  const std::vector<uint8_t> W = random_matrix(t, rows, kN, 1);
  const int64_t ab = ktune::row_bytes(QuantType::Q8_0, kN);
  std::vector<uint8_t> act(static_cast<size_t>(T * ab));
  std::vector<float> x(kN);
  std::mt19937 rng(4);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t i = 0; i < T; ++i) {
    for (float& v : x) v = dist(rng);
    ktune::cpu::quantize_activation(t, x.data(), act.data() + i * ab, kN, isa);
  }
  std::vector<float> Y(static_cast<size_t>(T * rows));
  for (auto _ : state) {
    ktune::cpu::matmul_rows(t, isa, W.data(), kN, 0, rows, act.data(), ab, T, Y.data(), rows);
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * rows * kN * T);
  state.SetLabel(ktune::cpu::isa_name(isa));
}

void isa_args(benchmark::internal::Benchmark* b) {
  for (int isa = 0; isa <= 3; ++isa) {
    b->Args({isa, 1});
    b->Args({isa, 40});
  }
}

void isa_only(benchmark::internal::Benchmark* b) {
  for (int isa = 0; isa <= 3; ++isa) b->Args({isa});
}

BENCHMARK_CAPTURE(BM_Matvec, q4_0, QuantType::Q4_0)
    ->Apply(isa_args)
    ->ArgNames({"isa", "copies"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_Matvec, q8_0, QuantType::Q8_0)
    ->Apply(isa_args)
    ->ArgNames({"isa", "copies"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_Matmul8, q4_0, QuantType::Q4_0)
    ->Apply(isa_only)
    ->ArgNames({"isa"})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_MatmulRows, q4_0, QuantType::Q4_0)
    ->Args({3, 768, 32})
    ->Args({3, 4096, 64})
    ->ArgNames({"isa", "rows", "tok"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_MatmulRows, q8_0, QuantType::Q8_0)
    ->Args({3, 768, 32})
    ->Args({3, 4096, 64})
    ->ArgNames({"isa", "rows", "tok"})
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
