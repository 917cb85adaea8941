// Decode matvec for Q4_K, Q5_K and Q6_K weights (ggml's super-block layouts, quant.h).
//
// Shape: one warp per row, 4 warps per block. A super-block (256 weights) is shared by 8 lanes,
// each taking 32 weights: for Q4_K/Q5_K one sub-block (its own 6-bit scale and min), for Q6_K a
// quarter of a half super-block (two 16-weight sub-blocks). A warp thus covers 4 super-blocks
// per step, enough for every real width (hidden 2048 = 8 super-blocks: two steps). Each lane
// computes d·sc·Σq·x − dmin·m·Σx for its weights in float32 (fmaf chains in a fixed order), sums
// its steps, and the warp butterfly adds the lanes: deterministic. Weights are dequantized in
// registers; x stays float32, loaded as float4 (the same 32 floats serve the lane's weights).
#include "cuda/common.cuh"
#include "ktune/engine/cuda/kquant_kernels.h"

namespace ktune::cuda {
namespace {

using detail::fp16_bits_to_float;

constexpr int kWarps = 4;
constexpr int kLanesPerBlock = 8;  // lanes sharing one super-block

__host__ __device__ constexpr int block_bytes_of(QuantType t) {
  return t == QuantType::Q4_K ? 144 : t == QuantType::Q5_K ? 176 : 210;
}

// The 32 floats x[0..31] (16-byte aligned) into registers.
__device__ __forceinline__ void load_x32(const float* __restrict__ x, float (&xv)[32]) {
  const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 t = __ldg(x4 + i);
    xv[4 * i] = t.x;
    xv[4 * i + 1] = t.y;
    xv[4 * i + 2] = t.z;
    xv[4 * i + 3] = t.w;
  }
}

// 6-bit scale and min of sub-block j from the 12 packed bytes (quant.h's unpack_k4_scales).
__device__ __forceinline__ void k4_scale_min(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K (kFive false) / Q5_K (kFive true): sub-block j of the block at `blk` (16-byte aligned).
template <bool kFive>
__device__ __forceinline__ float k4_subblock(const uint8_t* __restrict__ blk, int j,
                                             const float (&xv)[32]) {
  // Header: d, dmin, scales[12] in the first 16 bytes.
  const uint4 head = __ldg(reinterpret_cast<const uint4*>(blk));
  alignas(16) uint8_t hb[16];
  *reinterpret_cast<uint4*>(hb) = head;
  const float d = fp16_bits_to_float(static_cast<uint16_t>(hb[0] | (hb[1] << 8)));
  const float dmin = fp16_bits_to_float(static_cast<uint16_t>(hb[2] | (hb[3] << 8)));
  int sc, m;
  k4_scale_min(hb + 4, j, &sc, &m);
  const int qs_off = kFive ? 48 : 16;
  const int g = j / 2, shift = 4 * (j % 2);
  alignas(16) uint8_t q[32];
  *reinterpret_cast<uint4*>(q) = __ldg(reinterpret_cast<const uint4*>(blk + qs_off + 32 * g));
  *reinterpret_cast<uint4*>(q + 16) =
      __ldg(reinterpret_cast<const uint4*>(blk + qs_off + 32 * g + 16));
  alignas(16) uint8_t h[32];
  if (kFive) {
    *reinterpret_cast<uint4*>(h) = __ldg(reinterpret_cast<const uint4*>(blk + 16));
    *reinterpret_cast<uint4*>(h + 16) = __ldg(reinterpret_cast<const uint4*>(blk + 32));
  }
  float sq = 0.0f, sx = 0.0f;
#pragma unroll
  for (int l = 0; l < 32; ++l) {
    int v = (q[l] >> shift) & 0xF;
    if (kFive) v |= ((h[l] >> j) & 1) << 4;
    sq = fmaf(static_cast<float>(v), xv[l], sq);
    sx += xv[l];
  }
  return (d * static_cast<float>(sc)) * sq - (dmin * static_cast<float>(m)) * sx;
}

// Q6_K: quarter k of half h (weights 128h + 32k .. +31) of the block at `blk` (2-byte aligned).
__device__ __forceinline__ float q6_quarter(const uint8_t* __restrict__ blk, int h, int k,
                                            const float (&xv)[32]) {
  const uint16_t* ql16 = reinterpret_cast<const uint16_t*>(blk + 64 * h + 32 * (k % 2));
  const uint16_t* qh16 = reinterpret_cast<const uint16_t*>(blk + 128 + 32 * h);
  const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192 + 8 * h + 2 * k);
  const float d = fp16_bits_to_float(__ldg(reinterpret_cast<const uint16_t*>(blk + 208)));
  const int lshift = 4 * (k / 2), hshift = 2 * k;
  float s[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const uint16_t lw = __ldg(ql16 + i);
    const uint16_t hw = __ldg(qh16 + i);
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int l = 2 * i + b;
      const int lo = ((lw >> (8 * b)) >> lshift) & 0xF;
      const int hi = ((hw >> (8 * b)) >> hshift) & 3;
      s[l / 16] = fmaf(static_cast<float>((lo | (hi << 4)) - 32), xv[l], s[l / 16]);
    }
  }
  return d * static_cast<float>(__ldg(sc)) * s[0] + d * static_cast<float>(__ldg(sc + 1)) * s[1];
}

template <QuantType kType>
__global__ void matvec_kquant_kernel(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                     int rows, int nb, int64_t row_bytes, float* __restrict__ y) {
  constexpr int kBlockBytes = block_bytes_of(kType);
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int sub = lane % kLanesPerBlock;
  const uint8_t* row = w + r * row_bytes;
  float acc = 0.0f;
  for (int b = lane / kLanesPerBlock; b < nb; b += 32 / kLanesPerBlock) {
    const uint8_t* blk = row + static_cast<int64_t>(kBlockBytes) * b;
    float xv[32];
    load_x32(x + int64_t{256} * b + 32 * sub, xv);
    if constexpr (kType == QuantType::Q6_K) {
      acc += q6_quarter(blk, sub / 4, sub % 4, xv);
    } else {
      acc += k4_subblock<kType == QuantType::Q5_K>(blk, sub, xv);
    }
  }
  acc = detail::warp_sum(acc);
  if (lane == 0) y[r] = acc;
}

template <QuantType kType>
cudaError_t launch(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                   cudaStream_t stream) {
  const uintptr_t w_align = kType == QuantType::Q6_K ? 1u : 15u;
  if (rows < 0 || rows > 0x7fffffff || cols <= 0 || cols % 256 != 0 || cols > (1 << 28) ||
      w == nullptr || x == nullptr || y == nullptr ||
      (reinterpret_cast<uintptr_t>(w) & w_align) != 0 ||
      (reinterpret_cast<uintptr_t>(x) & 15u) != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int nb = static_cast<int>(cols / 256);
  const int64_t row_bytes = int64_t{block_bytes_of(kType)} * nb;
  const int64_t grid = (rows + kWarps - 1) / kWarps;
  matvec_kquant_kernel<kType><<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(
      static_cast<const uint8_t*>(w), x, static_cast<int>(rows), nb, row_bytes, y);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_matvec_q4_k(const void* w, const float* x, int64_t rows, int64_t cols,
                               float* y, cudaStream_t stream) {
  return launch<QuantType::Q4_K>(w, x, rows, cols, y, stream);
}

cudaError_t launch_matvec_q5_k(const void* w, const float* x, int64_t rows, int64_t cols,
                               float* y, cudaStream_t stream) {
  return launch<QuantType::Q5_K>(w, x, rows, cols, y, stream);
}

cudaError_t launch_matvec_q6_k(const void* w, const float* x, int64_t rows, int64_t cols,
                               float* y, cudaStream_t stream) {
  return launch<QuantType::Q6_K>(w, x, rows, cols, y, stream);
}

cudaError_t launch_matvec_kquant(QuantType type, const void* w, const float* x, int64_t rows,
                                 int64_t cols, float* y, cudaStream_t stream) {
  switch (type) {
    case QuantType::Q4_K:
      return launch_matvec_q4_k(w, x, rows, cols, y, stream);
    case QuantType::Q5_K:
      return launch_matvec_q5_k(w, x, rows, cols, y, stream);
    case QuantType::Q6_K:
      return launch_matvec_q6_k(w, x, rows, cols, y, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace ktune::cuda
