// Scalar K-quant dots (Q4_K, Q5_K, Q6_K weights × Q8_K activations): the reference the SIMD
// kernels are tested against, and the fallback without AVX2. Integer sums per super-block are
// exact (they fit int32 for any bytes: Q5_K's worst case is 8 · 63 · 32 · 31 · 128 < 2^27), so
// only the float combination per super-block, in the order dot_kernels.h states, can differ
// from another kernel's.
#include "cpu/dot_kernels.h"
#include "ktune/engine/quant.h"

namespace ktune::cpu::detail {
namespace {

void quantize_q8_k_scalar(const float* x, void* dst, int64_t n) {
  quantize_row(QuantType::Q8_K, x, dst, n);
}

// Float part of one super-block; separate statements so no compiler fuses them into an FMA.
inline void add_block(float& sum, float d, float dmin, float ad, int sumi, int summ) {
  const float dd = d * ad;
  const float dm = dmin * ad;
  const float pos = dd * static_cast<float>(sumi);
  const float neg = dm * static_cast<float>(summ);
  sum += pos;
  sum -= neg;
}

// Σ_j m[j] · (sum of the activations of sub-block j), from the 16-element bsums.
inline int mins_dot(const uint8_t m[8], const BlockQ8_K& a) {
  int summ = 0;
  for (int j = 0; j < 8; ++j) summ += m[j] * (a.bsums[2 * j] + a.bsums[2 * j + 1]);
  return summ;
}

}  // namespace

float dot_q4_k_q8_k_scalar(int64_t n, const void* w, const void* a) {
  const auto* wb = static_cast<const BlockQ4_K*>(w);
  const auto* ab = static_cast<const BlockQ8_K*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    uint8_t sc[8], m[8];
    unpack_k4_scales(wb[b].scales, sc, m);
    int sumi = 0;
    for (int j = 0; j < 8; ++j) {
      const uint8_t* q = wb[b].qs + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      const int8_t* x = ab[b].qs + 32 * j;
      int s = 0;
      for (int l = 0; l < 32; ++l) s += ((q[l] >> shift) & 0xF) * x[l];
      sumi += sc[j] * s;
    }
    add_block(sum, fp16_to_fp32(wb[b].d), fp16_to_fp32(wb[b].dmin), ab[b].d, sumi,
              mins_dot(m, ab[b]));
  }
  return sum;
}

float dot_q5_k_q8_k_scalar(int64_t n, const void* w, const void* a) {
  const auto* wb = static_cast<const BlockQ5_K*>(w);
  const auto* ab = static_cast<const BlockQ8_K*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    uint8_t sc[8], m[8];
    unpack_k4_scales(wb[b].scales, sc, m);
    int sumi = 0;
    for (int j = 0; j < 8; ++j) {
      const uint8_t* q = wb[b].qs + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      const int8_t* x = ab[b].qs + 32 * j;
      int s = 0;
      for (int l = 0; l < 32; ++l) {
        const int v = ((q[l] >> shift) & 0xF) | (((wb[b].qh[l] >> j) & 1) << 4);
        s += v * x[l];
      }
      sumi += sc[j] * s;
    }
    add_block(sum, fp16_to_fp32(wb[b].d), fp16_to_fp32(wb[b].dmin), ab[b].d, sumi,
              mins_dot(m, ab[b]));
  }
  return sum;
}

float dot_q6_k_q8_k_scalar(int64_t n, const void* w, const void* a) {
  const auto* wb = static_cast<const BlockQ6_K*>(w);
  const auto* ab = static_cast<const BlockQ8_K*>(a);
  float sum = 0.0f;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    int sumi = 0;
    for (int j = 0; j < 16; ++j) {
      // Sub-block j: half h = j / 8, quarter k = (j % 8) / 2 of that half (weights 32k..32k+31).
      const int h = j / 8, k = (j % 8) / 2;
      const uint8_t* ql = wb[b].ql + 64 * h + 32 * (k % 2);
      const uint8_t* qh = wb[b].qh + 32 * h;
      const int lshift = 4 * (k / 2), hshift = 2 * k;
      const int8_t* x = ab[b].qs + 16 * j;
      const int l0 = 16 * (j % 2);
      int s = 0;
      for (int l = l0; l < l0 + 16; ++l) {
        const int v = ((ql[l] >> lshift) & 0xF) | (((qh[l] >> hshift) & 3) << 4);
        s += (v - 32) * x[l - l0];
      }
      sumi += wb[b].scales[j] * s;
    }
    add_block(sum, fp16_to_fp32(wb[b].d), 0.0f, ab[b].d, sumi, 0);
  }
  return sum;
}

const KQuantKernelSet& scalar_kquant_kernels() {
  static const KQuantKernelSet set{
      matmul_by_rows<dot_q4_k_q8_k_scalar>,
      matmul_by_rows<dot_q5_k_q8_k_scalar>,
      matmul_by_rows<dot_q6_k_q8_k_scalar>,
      quantize_q8_k_scalar,
  };
  return set;
}

}  // namespace ktune::cpu::detail
