// Absorbed MLA decode attention over the latent cache (launch_mla_attention, mla_kernels.h).
//
// Every query head attends over the same cache rows (one latent "head" shared by all: MQA in
// the latent space), so a block takes a group of heads and reads each row once for all of them.
// The sequence is split into at most kMaxSplits contiguous spans (a multiple of kMlaChunk
// positions each, computed on the device from *pos, so a captured graph serves every position);
// grid = (splits, head groups). A block walks its span in chunks of kMlaChunk positions with an
// online softmax: scores of the chunk into shared memory (one warp per position: the row in
// registers, one butterfly per head), then per head the running max, the rescale of what was
// summed before and the chunk's exponentials, then every thread adds the chunk's weighted latent
// values for its latent dims and all heads of the group. A second launch merges the spans in
// span order. Every sum has a fixed order: bit-identical results run to run.
//
// Versus the CPU engine (cpu_ops::attend_group: all scores, max, exp, normalize, weighted sum):
// the same products, summed in another order, and the normalization comes last here; logits agree
// to float rounding.
#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "ktune/engine/cuda/mla_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / detail::kWarp;
constexpr int kMaxSplits = 64;
constexpr int kMaxRank = 1024;
constexpr int kRankPerThread = kMaxRank / kThreads;  // latent dims a thread sums
constexpr int kMaxSmem = 48 * 1024;                  // no opt-in needed

// Positions per split for n positions: whole chunks, at most kMaxSplits splits.
__device__ __forceinline__ int span_of(int n, int splits) {
  const int chunks = (n + kMlaChunk - 1) / kMlaChunk;
  return (chunks + splits - 1) / splits * kMlaChunk;
}

// R: registers per lane for a cache row (lat <= 32 * R); q rows are staged R * 32 wide,
// zero-padded, so the score loop needs no bounds check.
template <int R>
__global__ void __launch_bounds__(kThreads)
    mla_partial_kernel(const float* __restrict__ q, int64_t q_stride,
                       const float* __restrict__ cache, const int32_t* __restrict__ pos,
                       int n_heads, int hb, int rank, int lat, int max_ctx, int splits, float scale,
                       float* __restrict__ part, float* __restrict__ ml) {
  extern __shared__ float smem[];
  constexpr int kQ = R * detail::kWarp;
  float* qs = smem;                    // [hb][kQ]
  float* sc = qs + hb * kQ;            // [hb][kMlaChunk]: scores, then their exponentials
  float* m_run = sc + hb * kMlaChunk;  // [hb] running max
  float* l_run = m_run + hb;           // [hb] running sum of exponentials
  float* alpha = l_run + hb;           // [hb] rescale of what was summed before this chunk
  const int p_last = *pos;
  if (p_last < 0 || p_last >= max_ctx) return;  // the merge writes NaN
  const int n = p_last + 1;
  const int span = span_of(n, splits);
  const int s = blockIdx.x;
  const int begin = s * span;
  if (begin >= n) return;
  const int end = min(n, begin + span);
  const int h0 = blockIdx.y * hb;
  const int nh = min(hb, n_heads - h0);
  const int lane = threadIdx.x % detail::kWarp;
  const int warp = threadIdx.x / detail::kWarp;

  for (int i = threadIdx.x; i < hb * kQ; i += kThreads) {
    const int hh = i / kQ, e = i % kQ;
    qs[i] = (hh < nh && e < lat) ? q[(h0 + hh) * q_stride + e] : 0.0f;
  }
  for (int hh = threadIdx.x; hh < hb; hh += kThreads) {
    m_run[hh] = -INFINITY;
    l_run[hh] = 0.0f;
  }
  float acc[kRankPerThread][kMlaHeads];
#pragma unroll
  for (int k = 0; k < kRankPerThread; ++k) {
#pragma unroll
    for (int hh = 0; hh < kMlaHeads; ++hh) acc[k][hh] = 0.0f;
  }
  __syncthreads();

  for (int p0 = begin; p0 < end; p0 += kMlaChunk) {
    const int P = min(kMlaChunk, end - p0);
    // Scores of the chunk: warp per position, the row in registers, one butterfly per head.
    for (int pl = warp; pl < P; pl += kWarpsPerBlock) {
      const float* row = cache + static_cast<int64_t>(p0 + pl) * lat;
      float v[R];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int e = lane + detail::kWarp * i;
        v[i] = e < lat ? __ldg(row + e) : 0.0f;
      }
      for (int hh = 0; hh < nh; ++hh) {
        const float* qh = qs + hh * kQ;
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < R; ++i) d = fmaf(qh[lane + detail::kWarp * i], v[i], d);
        d = detail::warp_sum(d);
        if (lane == 0) sc[hh * kMlaChunk + pl] = d * scale;
      }
    }
    __syncthreads();
    // Online softmax, warp per head: the new running max, the chunk's exponentials against it,
    // the rescale of the earlier sums.
    for (int hh = warp; hh < nh; hh += kWarpsPerBlock) {
      float* sh = sc + hh * kMlaChunk;
      float mx = -INFINITY;
      for (int pl = lane; pl < P; pl += detail::kWarp) mx = fmaxf(mx, sh[pl]);
      mx = detail::warp_max(mx);
      const float m_old = m_run[hh];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
      for (int pl = lane; pl < P; pl += detail::kWarp) {
        const float e = expf(sh[pl] - m_new);
        sh[pl] = e;
        sum += e;
      }
      sum = detail::warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        // m_old is -inf only before the first chunk, when nothing has been summed yet.
        const float a = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
        alpha[hh] = a;
        l_run[hh] = fmaf(l_run[hh], a, sum);
        m_run[hh] = m_new;
      }
    }
    __syncthreads();
    // Weighted latent values: thread t sums dims t, t + 256, ... for every head of the group.
#pragma unroll
    for (int k = 0; k < kRankPerThread; ++k) {
      const int r = threadIdx.x + k * kThreads;
      if (r < rank) {
#pragma unroll
        for (int hh = 0; hh < kMlaHeads; ++hh) {
          if (hh < nh) acc[k][hh] *= alpha[hh];
        }
        for (int pl = 0; pl < P; ++pl) {
          const float vr = __ldg(cache + static_cast<int64_t>(p0 + pl) * lat + r);
#pragma unroll
          for (int hh = 0; hh < kMlaHeads; ++hh) {
            if (hh < nh) acc[k][hh] = fmaf(sc[hh * kMlaChunk + pl], vr, acc[k][hh]);
          }
        }
      }
    }
    __syncthreads();  // sc and alpha are rewritten by the next chunk
  }
#pragma unroll
  for (int hh = 0; hh < kMlaHeads; ++hh) {
    if (hh < nh) {
      const int64_t o = static_cast<int64_t>(s) * n_heads + h0 + hh;
#pragma unroll
      for (int k = 0; k < kRankPerThread; ++k) {
        const int r = threadIdx.x + k * kThreads;
        if (r < rank) part[o * rank + r] = acc[k][hh];
      }
      if (threadIdx.x == 0) {
        ml[2 * o] = m_run[hh];
        ml[2 * o + 1] = l_run[hh];
      }
    }
  }
}

// out[h][r] = sum_s exp(m_s - M) part[s][h][r] / sum_s exp(m_s - M) l_s, spans in order.
__global__ void __launch_bounds__(kThreads)
    mla_merge_kernel(const int32_t* __restrict__ pos, int n_heads, int rank, int max_ctx,
                     int splits, const float* __restrict__ part, const float* __restrict__ ml,
                     float* __restrict__ out, int64_t out_stride) {
  const int h = blockIdx.x;
  float* oh = out + h * out_stride;
  const int p_last = *pos;
  if (p_last < 0 || p_last >= max_ctx) {
    for (int r = threadIdx.x; r < rank; r += kThreads) oh[r] = __int_as_float(0x7fc00000);
    return;
  }
  const int n = p_last + 1;
  const int span = span_of(n, splits);
  const int used = (n + span - 1) / span;
  float mx = -INFINITY;
  for (int s = 0; s < used; ++s) mx = fmaxf(mx, ml[2 * (static_cast<int64_t>(s) * n_heads + h)]);
  float l = 0.0f;
  for (int s = 0; s < used; ++s) {
    const int64_t o = static_cast<int64_t>(s) * n_heads + h;
    l = fmaf(expf(ml[2 * o] - mx), ml[2 * o + 1], l);
  }
  const float inv = 1.0f / l;
  for (int r = threadIdx.x; r < rank; r += kThreads) {
    float a = 0.0f;
    for (int s = 0; s < used; ++s) {
      const int64_t o = static_cast<int64_t>(s) * n_heads + h;
      a = fmaf(expf(ml[2 * o] - mx), part[o * rank + r], a);
    }
    oh[r] = a * inv;
  }
}

int splits_for(int64_t max_ctx) {
  return static_cast<int>(std::min<int64_t>(kMaxSplits, (max_ctx + kMlaChunk - 1) / kMlaChunk));
}

// Registers per lane for a row of lat floats: one of the instantiated widths.
int row_regs(int64_t lat) {
  for (int r : {4, 8, 12, 16, 20, 24, 32}) {
    if (lat <= 32 * r) return r;
  }
  return 0;
}

// Heads per block: as many as fit in kMaxSmem, then balanced over the groups.
int heads_per_block(int64_t n_heads, int regs) {
  const int64_t per_head = 4 * (int64_t{regs} * 32 + kMlaChunk + 3);
  const int64_t fit = std::min<int64_t>(kMlaHeads, (kMaxSmem - 64) / per_head);
  const int64_t groups = (n_heads + fit - 1) / fit;
  return static_cast<int>((n_heads + groups - 1) / groups);
}

}  // namespace

size_t mla_attention_workspace_bytes(int64_t n_heads, int64_t rank, int64_t max_ctx) {
  const int64_t splits = splits_for(std::max<int64_t>(max_ctx, 1));
  return static_cast<size_t>(splits * n_heads * (rank + 2)) * sizeof(float);
}

cudaError_t launch_mla_attention(const float* q, int64_t q_stride, const float* cache,
                                 const int32_t* pos, int64_t n_heads, int64_t rank, int64_t rope,
                                 int64_t max_ctx, float scale, void* workspace, float* out,
                                 int64_t out_stride, cudaStream_t stream) {
  const int64_t lat = rank + rope;
  const int regs = row_regs(lat);
  if (q == nullptr || cache == nullptr || pos == nullptr || workspace == nullptr ||
      out == nullptr || n_heads < 1 || n_heads > 65535 || rank < 1 || rank > kMaxRank || rope < 0 ||
      regs == 0 || q_stride < lat || out_stride < rank || max_ctx < 1 ||
      max_ctx > (int64_t{1} << 24)) {
    return cudaErrorInvalidValue;
  }
  const int splits = splits_for(max_ctx);
  const int hb = heads_per_block(n_heads, regs);
  const int groups = static_cast<int>((n_heads + hb - 1) / hb);
  float* part = static_cast<float*>(workspace);
  float* ml = part + static_cast<int64_t>(splits) * n_heads * rank;
  const size_t smem = static_cast<size_t>(4 * hb * (regs * 32 + kMlaChunk + 3));
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(groups));
  const int nh = static_cast<int>(n_heads), rk = static_cast<int>(rank), lt = static_cast<int>(lat),
            mc = static_cast<int>(max_ctx);
#define KTUNE_MLA_PARTIAL(R)                                                                       \
  mla_partial_kernel<R><<<grid, kThreads, smem, stream>>>(q, q_stride, cache, pos, nh, hb, rk, lt, \
                                                          mc, splits, scale, part, ml)
  switch (regs) {
    case 4:
      KTUNE_MLA_PARTIAL(4);
      break;
    case 8:
      KTUNE_MLA_PARTIAL(8);
      break;
    case 12:
      KTUNE_MLA_PARTIAL(12);
      break;
    case 16:
      KTUNE_MLA_PARTIAL(16);
      break;
    case 20:
      KTUNE_MLA_PARTIAL(20);
      break;
    case 24:
      KTUNE_MLA_PARTIAL(24);
      break;
    default:
      KTUNE_MLA_PARTIAL(32);
      break;
  }
#undef KTUNE_MLA_PARTIAL
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mla_merge_kernel<<<static_cast<unsigned>(n_heads), kThreads, 0, stream>>>(
      pos, nh, rk, mc, splits, part, ml, out, out_stride);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
