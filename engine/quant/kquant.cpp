// K-quant reference quantizers, written from the algorithm of ggml's quantize_row_q{4,5,6,8}_K_ref
// so a file quantized by ktune and one quantized by llama.cpp (without an importance matrix) hold
// the same bytes. Bit-exactness rests on doing the same float operations in the same order:
// every expression below keeps ggml's association, and this file is built without FMA flags so
// no multiply-add is fused (nor is ggml's reference). tests/unit/test_kquant.cpp checks the
// bytes against a fixture made by ggml itself (tests/data/kquant).
#include "quant/kquant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace ktune::kquant {
namespace {

constexpr int kQK = 256;
constexpr float kGroupMaxEps = 1e-15f;  // ggml's GROUP_MAX_EPS: below it a group is all zero

// Least-squares fit of x ≈ scale * L + min with L in 0..nmax and min <= 0, weighted by w:
// starts from the range (max - min) / nmax, then tries nstep + 1 other step counts around nmax
// (rmin + rdelta * is) and keeps the one with the smallest weighted squared error. Returns the
// scale, stores -min in *neg_min and the codes in L.
// nmax is a template argument so the clamps and step counts are constants in the hot loops.
template <int nmax>
float fit_scale_min(int n, const float* x, const float* w, uint8_t* L, float* neg_min,
                    uint8_t* Laux, float rmin, float rdelta, int nstep) {
  float min = x[0];
  float max = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    std::fill(L, L + n, uint8_t{0});
    *neg_min = -min;
    return 0.0f;
  }
  float iscale = static_cast<float>(nmax) / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(iscale * (x[i] - min));
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * static_cast<float>(L[i]) + min - x[i];
    diff = diff * diff;
    best_error += w[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * static_cast<float>(is) + static_cast<float>(nmax)) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      Laux[i] = static_cast<uint8_t>(l);
      const float fl = static_cast<float>(l);
      sum_l += w[i] * fl;
      sum_l2 += w[i] * fl * fl;
      sum_xl += w[i] * fl * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * static_cast<float>(Laux[i]) + this_min - x[i];
        diff = diff * diff;
        cur_error += w[i] * diff;
      }
      if (cur_error < best_error) {
        std::memcpy(L, Laux, static_cast<size_t>(n));
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *neg_min = -min;
  return scale;
}

// Symmetric fit x ≈ scale * (L - nmax), L in 0..2*nmax-1, weighted by x² (ggml's rmse_type 1):
// the largest-magnitude value maps to -nmax, then 18 nearby step counts are tried and the one
// with the best weighted fit kept.
template <int nmax>
float fit_scale_symmetric(int n, const float* x, int8_t* L) {
  float max = 0;
  float amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    std::fill(L, L + n, int8_t{0});
    return 0.0f;
  }
  auto code = [](float v) { return std::max(-nmax, std::min(nmax - 1, nearest_int(v))); };
  float iscale = static_cast<float>(-nmax) / max;
  float sumlx = 0;
  float suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = code(iscale * x[i]);
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    const float fl = static_cast<float>(l);
    sumlx += w * x[i] * fl;
    suml2 += w * fl * fl;
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const float fl = static_cast<float>(code(iscale * x[i]));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * fl;
      suml2 += w * fl * fl;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(nmax + code(iscale * x[i]));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// The scale/min stage shared by Q4_K and Q5_K: fits each 32-weight sub-block (codes 0..nmax),
// quantizes the 8 scales and 8 mins to 6 bits against the largest of each, and packs them.
// Returns the final codes in L.
template <int nmax, class Block>
void fit_k4_block(const float* x, float rmin, float rdelta, int nstep, Block& y, uint8_t* L) {
  float scales[8], mins[8], weights[32];
  uint8_t Laux[32];
  float max_scale = 0;  // the min is subtracted, so scales are >= 0
  float max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
    scales[j] = fit_scale_min<nmax>(32, xs, weights, L + 32 * j, &mins[j], Laux, rmin, rdelta,
                                    nstep);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  uint8_t ls[8], lm[8];
  for (int j = 0; j < 8; ++j) {
    // ggml stores the rounded value in a uint8_t before clamping: keep that wrap-around.
    ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
    lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
  }
  for (int j = 0; j < 4; ++j) {
    y.scales[j] = static_cast<uint8_t>(ls[j] | ((ls[j + 4] >> 4) << 6));
    y.scales[j + 4] = static_cast<uint8_t>(lm[j] | ((lm[j + 4] >> 4) << 6));
    y.scales[j + 8] = static_cast<uint8_t>((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
  }
  y.d = fp32_to_fp16(max_scale / 63.f);
  y.dmin = fp32_to_fp16(max_min / 63.f);

  // Requantize against the stored (rounded) scales; a sub-block whose scale rounded to zero
  // keeps the codes of its fit, as ggml does.
  uint8_t sc[8], m[8];
  unpack_k4_scales(y.scales, sc, m);
  for (int j = 0; j < 8; ++j) {
    const float d = fp16_to_fp32(y.d) * static_cast<float>(sc[j]);
    if (d == 0.0f) continue;
    const float dm = fp16_to_fp32(y.dmin) * static_cast<float>(m[j]);
    for (int i = 0; i < 32; ++i) {
      const int l = nearest_int((x[32 * j + i] + dm) / d);
      L[32 * j + i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    }
  }
}

}  // namespace

void quantize_q4_k(const float* x, BlockQ4_K* y, int64_t nb) {
  uint8_t L[kQK];
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    fit_k4_block<15>(x, -1.f, 0.1f, 20, y[b], L);
    for (int g = 0; g < 4; ++g) {
      for (int l = 0; l < 32; ++l) {
        y[b].qs[32 * g + l] = static_cast<uint8_t>(L[64 * g + l] | (L[64 * g + 32 + l] << 4));
      }
    }
  }
}

void quantize_q5_k(const float* x, BlockQ5_K* y, int64_t nb) {
  uint8_t L[kQK];
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    fit_k4_block<31>(x, -0.5f, 0.1f, 15, y[b], L);
    std::memset(y[b].qh, 0, sizeof(y[b].qh));
    for (int g = 0; g < 4; ++g) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t lo = L[64 * g + l], hi = L[64 * g + 32 + l];
        y[b].qh[l] = static_cast<uint8_t>(y[b].qh[l] | ((lo >> 4) << (2 * g)) |
                                          ((hi >> 4) << (2 * g + 1)));
        y[b].qs[32 * g + l] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
      }
    }
  }
}

void quantize_q6_k(const float* x, BlockQ6_K* y, int64_t nb) {
  int8_t L[kQK];
  float scales[16];
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    float max_scale = 0;
    float max_abs_scale = 0;
    for (int j = 0; j < 16; ++j) {
      scales[j] = fit_scale_symmetric<32>(16, x + 16 * j, L + 16 * j);
      const float abs_scale = std::fabs(scales[j]);
      if (abs_scale > max_abs_scale) {
        max_abs_scale = abs_scale;
        max_scale = scales[j];
      }
    }
    BlockQ6_K& o = y[b];
    if (max_abs_scale < kGroupMaxEps) {
      std::memset(&o, 0, sizeof(o));
      continue;
    }
    const float iscale = -128.f / max_scale;
    o.d = fp32_to_fp16(1 / iscale);
    for (int j = 0; j < 16; ++j) {
      o.scales[j] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[j])));
    }
    for (int j = 0; j < 16; ++j) {
      const float d = fp16_to_fp32(o.d) * static_cast<float>(o.scales[j]);
      if (d == 0.0f) continue;
      for (int i = 0; i < 16; ++i) {
        const int l = nearest_int(x[16 * j + i] / d);
        L[16 * j + i] = static_cast<int8_t>(std::max(-32, std::min(31, l)) + 32);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int8_t* Lh = L + 128 * h;
      uint8_t* ql = o.ql + 64 * h;
      uint8_t* qh = o.qh + 32 * h;
      for (int l = 0; l < 32; ++l) {
        const int q1 = Lh[l], q2 = Lh[l + 32], q3 = Lh[l + 64], q4 = Lh[l + 96];
        ql[l] = static_cast<uint8_t>((q1 & 0xF) | ((q3 & 0xF) << 4));
        ql[l + 32] = static_cast<uint8_t>((q2 & 0xF) | ((q4 & 0xF) << 4));
        qh[l] = static_cast<uint8_t>((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) |
                                     ((q4 >> 4) << 6));
      }
    }
  }
}

void quantize_q8_k(const float* x, BlockQ8_K* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    float max = 0;
    float amax = 0;
    for (int j = 0; j < kQK; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) {
        amax = ax;
        max = x[j];
      }
    }
    BlockQ8_K& o = y[b];
    if (amax == 0.0f) {
      std::memset(&o, 0, sizeof(o));  // ggml leaves bsums unwritten here; zeros are their value
      continue;
    }
    // -127 rather than -128 so that no code is -128 (ggml's choice, kept for identical bytes).
    const float iscale = -127.f / max;
    for (int j = 0; j < kQK; ++j) {
      // Clamped below too: only non-finite inputs could reach -128 or less.
      o.qs[j] =
          static_cast<int8_t>(std::max(-128, std::min(127, nearest_int_clamped(iscale * x[j]))));
    }
    for (int j = 0; j < 16; ++j) {
      int sum = 0;
      for (int i = 0; i < 16; ++i) sum += o.qs[16 * j + i];
      o.bsums[j] = static_cast<int16_t>(sum);
    }
    o.d = 1 / iscale;
  }
}

void dequantize_q4_k(const BlockQ4_K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = fp16_to_fp32(x[b].d);
    const float dmin = fp16_to_fp32(x[b].dmin);
    uint8_t sc[8], m[8];
    unpack_k4_scales(x[b].scales, sc, m);
    for (int g = 0; g < 4; ++g) {
      const uint8_t* q = x[b].qs + 32 * g;
      const float d1 = d * sc[2 * g], m1 = dmin * m[2 * g];
      const float d2 = d * sc[2 * g + 1], m2 = dmin * m[2 * g + 1];
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

void dequantize_q5_k(const BlockQ5_K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = fp16_to_fp32(x[b].d);
    const float dmin = fp16_to_fp32(x[b].dmin);
    uint8_t sc[8], m[8];
    unpack_k4_scales(x[b].scales, sc, m);
    for (int g = 0; g < 4; ++g) {
      const uint8_t* q = x[b].qs + 32 * g;
      const uint8_t* qh = x[b].qh;
      const float d1 = d * sc[2 * g], m1 = dmin * m[2 * g];
      const float d2 = d * sc[2 * g + 1], m2 = dmin * m[2 * g + 1];
      for (int l = 0; l < 32; ++l) {
        const int v = (q[l] & 0xF) | (((qh[l] >> (2 * g)) & 1) << 4);
        *y++ = d1 * static_cast<float>(v) - m1;
      }
      for (int l = 0; l < 32; ++l) {
        const int v = (q[l] >> 4) | (((qh[l] >> (2 * g + 1)) & 1) << 4);
        *y++ = d2 * static_cast<float>(v) - m2;
      }
    }
  }
}

void dequantize_q6_k(const BlockQ6_K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, y += kQK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = x[b].ql + 64 * h;
      const uint8_t* qh = x[b].qh + 32 * h;
      const int8_t* sc = x[b].scales + 8 * h;
      float* out = y + 128 * h;
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
        out[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        out[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        out[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
    }
  }
}

void dequantize_q8_k(const BlockQ8_K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    for (int j = 0; j < kQK; ++j) *y++ = x[b].d * static_cast<float>(x[b].qs[j]);
  }
}

}  // namespace ktune::kquant
