// Writes the K-quant fixture of tests/data/kquant: 8 super-blocks of deterministic input floats
// (input.f32) and what ggml's reference quantizers make of them (q4_k.bin, q5_k.bin, q6_k.bin,
// q8_k.bin). ktune's quantizers must reproduce these bytes exactly (tests/unit/test_kquant.cpp).
// Build against a llama.cpp build's ggml-base (see tests/data/kquant/README.md for the command).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

// ggml's reference quantizers (ggml/src/ggml-quants.h); block pointers as void*.
extern "C" {
void quantize_row_q4_K_ref(const float* x, void* y, int64_t k);
void quantize_row_q5_K_ref(const float* x, void* y, int64_t k);
void quantize_row_q6_K_ref(const float* x, void* y, int64_t k);
void quantize_row_q8_K_ref(const float* x, void* y, int64_t k);
}

namespace {

uint64_t g_state = 0x9E3779B97F4A7C15ull;
double uniform() {  // [0, 1), xorshift64*
  g_state ^= g_state >> 12;
  g_state ^= g_state << 25;
  g_state ^= g_state >> 27;
  return static_cast<double>((g_state * 2685821657736338717ull) >> 11) * 0x1p-53;
}
float normal() {  // sum of 12 uniforms: mean 0, variance 1
  double s = -6.0;
  for (int i = 0; i < 12; ++i) s += uniform();
  return static_cast<float>(s);
}

void write(const std::string& path, const void* p, size_t n) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(p, 1, n, f) != n || std::fclose(f) != 0) {
    std::perror(path.c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : ".";
  constexpr int kQK = 256, kBlocks = 8, n = kQK * kBlocks;
  std::vector<float> x(n);
  for (int b = 0; b < kBlocks; ++b) {
    float* v = x.data() + b * kQK;
    for (int i = 0; i < kQK; ++i) {
      switch (b) {
        case 0: v[i] = normal(); break;                                   // typical weights
        case 1: v[i] = 0.0f; break;                                       // all zero
        case 2: v[i] = 0.5f + 1.5f * static_cast<float>(uniform()); break;  // all positive
        case 3: v[i] = -0.01f - static_cast<float>(uniform()); break;     // all negative
        case 4: v[i] = i == 77 ? 1000.0f : 0.02f * normal(); break;       // one outlier
        case 5: v[i] = 1e-6f * normal(); break;                           // fp16-subnormal scales
        case 6: v[i] = (i / 32) % 2 ? 0.75f : -0.25f; break;              // constant sub-blocks
        default: v[i] = std::ldexp(normal(), i / 32 - 4); break;          // scales 2^-4 .. 2^3
      }
    }
  }
  write(dir + "/input.f32", x.data(), sizeof(float) * n);
  // Zeroed before each call: ggml leaves the bsums of an all-zero Q8_K block unwritten (ktune
  // writes zeros), so a zeroed destination makes both agree.
  std::vector<uint8_t> y(static_cast<size_t>(kBlocks) * 292);
  quantize_row_q4_K_ref(x.data(), y.data(), n);
  write(dir + "/q4_k.bin", y.data(), kBlocks * 144);
  std::fill(y.begin(), y.end(), 0);
  quantize_row_q5_K_ref(x.data(), y.data(), n);
  write(dir + "/q5_k.bin", y.data(), kBlocks * 176);
  std::fill(y.begin(), y.end(), 0);
  quantize_row_q6_K_ref(x.data(), y.data(), n);
  write(dir + "/q6_k.bin", y.data(), kBlocks * 210);
  std::fill(y.begin(), y.end(), 0);
  quantize_row_q8_K_ref(x.data(), y.data(), n);
  write(dir + "/q8_k.bin", y.data(), kBlocks * 292);
  std::printf("wrote %d super-blocks of each type to %s\n", kBlocks, dir.c_str());
  return 0;
}
