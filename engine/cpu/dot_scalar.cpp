// Scalar reference kernels: the ground truth every SIMD kernel is tested against, and the
// fallback on CPUs without AVX2. Quantized dots follow ggml's order of operations (an exact
// integer sum per block, then sum += sumi * d_w * d_a in float) so results match ggml's CPU
// backend; float dots accumulate in double since speed does not matter here.
#include <cmath>

#include "cpu/dot_kernels.h"
#include "ktune/engine/quant.h"

namespace ktune::cpu::detail {
namespace {

constexpr int kQBlock = 32;

void quantize_q8_0_scalar(const float* x, void* dst, int64_t n) {
  quantize_row(QuantType::Q8_0, x, dst, n);
}

}  // namespace

float dot_q4_0_q8_0_scalar(int64_t n, const void* w, const void* a) {
  const auto* wb = static_cast<const BlockQ4_0*>(w);
  const auto* ab = static_cast<const BlockQ8_0*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQBlock; ++b) {
    int sumi = 0;
    for (int j = 0; j < 16; ++j) {
      sumi += ((wb[b].qs[j] & 0x0F) - 8) * ab[b].qs[j];
      sumi += ((wb[b].qs[j] >> 4) - 8) * ab[b].qs[j + 16];
    }
    sum += static_cast<float>(sumi) * fp16_to_fp32(wb[b].d) * fp16_to_fp32(ab[b].d);
  }
  return sum;
}

float dot_q8_0_q8_0_scalar(int64_t n, const void* w, const void* a) {
  const auto* wb = static_cast<const BlockQ8_0*>(w);
  const auto* ab = static_cast<const BlockQ8_0*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQBlock; ++b) {
    int sumi = 0;
    for (int j = 0; j < kQBlock; ++j) sumi += wb[b].qs[j] * ab[b].qs[j];
    sum += static_cast<float>(sumi) * fp16_to_fp32(wb[b].d) * fp16_to_fp32(ab[b].d);
  }
  return sum;
}

float dot_f16_f32_scalar(int64_t n, const void* w, const void* a) {
  const auto* wh = static_cast<const uint16_t*>(w);
  const auto* af = static_cast<const float*>(a);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(fp16_to_fp32(wh[i])) * af[i];
  return static_cast<float>(sum);
}

float dot_bf16_f32_scalar(int64_t n, const void* w, const void* a) {
  const auto* wh = static_cast<const uint16_t*>(w);
  const auto* af = static_cast<const float*>(a);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(bf16_to_fp32(wh[i])) * af[i];
  return static_cast<float>(sum);
}

float dot_f32_f32_scalar(int64_t n, const void* w, const void* a) {
  const auto* wf = static_cast<const float*>(w);
  const auto* af = static_cast<const float*>(a);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(wf[i]) * af[i];
  return static_cast<float>(sum);
}

const KernelSet& scalar_kernels() {
  static const KernelSet set{
      matmul_by_rows<dot_q4_0_q8_0_scalar>, matmul_by_rows<dot_q8_0_q8_0_scalar>,
      matmul_by_rows<dot_f16_f32_scalar>,   matmul_by_rows<dot_bf16_f32_scalar>,
      matmul_by_rows<dot_f32_f32_scalar>,   quantize_q8_0_scalar,
  };
  return set;
}

}  // namespace ktune::cpu::detail
