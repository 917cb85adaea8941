// Decode attention: one query token, grouped-query heads, fp16 KV cache preallocated as
// [n_kv][max_ctx][hd]. The token's position is read from device memory, so one captured graph
// serves every step; the grid is sized for max_ctx and blocks past the position return at once.
//
// Two launches:
//  1. attn_decode_partial, grid (n_heads, max_ctx / kAttnChunk): block (h, s) scores positions
//     [s*C, min(pos+1, (s+1)*C)) for query head h (one warp per position, lanes over head_dim,
//     warp butterfly), softmax with the chunk's max, and the unnormalized p.V for its chunk,
//     written to the workspace with the chunk's max m and sum l. Position `pos` itself is read
//     from k_new/v_new in float32 (as the CPU engine attends its current token), and block
//     (first head of each kv group, split 0) stores k_new/v_new into the cache as fp16 (RNE).
//  2. attn_decode_combine, one block per head: merges the splits in split order
//     (M = max m_s; out = sum_s e^(m_s-M) o_s / sum_s e^(m_s-M) l_s): fixed order, deterministic.
// Heads of one kv group re-read the same K/V rows; they meet in L2 (decode reads of one layer's
// cache are small next to the weights).
//
// launch_attention_decode_qknorm_rope (the decode engine's) is one launch on sm_90 instead
// (attn_decode_cluster): a cluster of kClusterBlocks blocks per kv head, one warp per query head
// of the group. Block r of the cluster takes chunks r, r + 8, ... of kKvChunk positions; it copies
// each chunk's K and V rows (fp16) to shared memory with cp.async, two buffers so the next chunk
// streams in while one is scored - the first chunk before pdl_wait(), since cached positions <
// pos were written by earlier steps - then normalizes and
// rotates its group's q heads and k_new, scores one position per lane (K rows XOR-swizzled in
// 16-byte units so a warp's row reads do not collide in banks), and keeps a running (max, sum,
// unnormalized p.V) per head across its chunks. The blocks then merge in rank order through
// distributed shared memory (cluster barrier, no global workspace, no atomics): deterministic.
// Requirements beyond launch_attention_decode's: head_dim % 64 == 0, group <= 16; otherwise (and
// before sm_90) the two-launch path runs with the norm and RoPE folded into its first kernel.
#include <cooperative_groups.h>

#include <cmath>
#include <mutex>

#include "cuda/common.cuh"
#include "cuda/per_device.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 128;

// RMSNorm (w * (x * r)) then NEOX RoPE of one head held in shared memory, by the whole block.
__device__ __forceinline__ void norm_rope_head(float* v, const float* __restrict__ w, float eps,
                                               float p, const float* __restrict__ inv_freq,
                                               int hd, float* red) {
  float ss = 0.0f;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) ss = fmaf(v[d], v[d], ss);
  ss = detail::block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(hd) + eps);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) v[d] = w[d] * (v[d] * r);
  __syncthreads();
  const int half = hd / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = p * inv_freq[i];
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float c = static_cast<float>(cd);
    const float sn = static_cast<float>(sd);
    const float a = v[i];
    const float b = v[half + i];
    v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
    v[half + i] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn));
  }
  __syncthreads();
}

// kFuse: q / k_new are the raw projections, normalized and rotated here (q_norm, k_norm, eps,
// inv_freq); else they are final and the norm arguments are unused.
// kBatch: sequence b = blockIdx.z reads q, k_new, v_new and pos at its own row, its cache at
// b * seq_stride elements and its own workspace slice (launch_attention_decode_batch).
template <bool kFuse, bool kBatch>
__global__ void attn_decode_partial(const float* __restrict__ q, const float* __restrict__ k_new,
                                    const float* __restrict__ v_new, uint16_t* __restrict__ k_cache,
                                    uint16_t* __restrict__ v_cache, const int32_t* __restrict__ pos,
                                    int group, int hd, int max_ctx, float scale,
                                    float* __restrict__ ws_o, float* __restrict__ ws_ml,
                                    const float* __restrict__ q_norm,
                                    const float* __restrict__ k_norm, float eps,
                                    const float* __restrict__ inv_freq, int64_t seq_stride) {
  if constexpr (kBatch) {
    const int64_t b = blockIdx.z;
    const int64_t n_heads = gridDim.x, n_kv = gridDim.x / group, ns = gridDim.y;
    q += b * n_heads * hd;
    k_new += b * n_kv * hd;
    v_new += b * n_kv * hd;
    k_cache += b * seq_stride;
    v_cache += b * seq_stride;
    pos += b;
    ws_o += b * n_heads * ns * hd;
    ws_ml += b * n_heads * ns * 2;
  }
  extern __shared__ float smem[];
  float* qs = smem;           // hd
  float* kn = smem + hd;      // hd: this token's key (normalized and rotated when kFuse)
  float* sc = smem + 2 * hd;  // kAttnChunk
  __shared__ float red[32];
  const int h = blockIdx.x;
  const int s = blockIdx.y;
  const int nsplit = gridDim.y;
  const int kvh = h / group;
  const int P = *pos;
  if (P < 0 || P >= max_ctx) return;
  const int start = s * kAttnChunk;
  const int end = min(P + 1, start + kAttnChunk);
  if (start >= end) return;  // never for split 0, which stores the new token below
  const int len = end - start;
  const float* vn = v_new + static_cast<int64_t>(kvh) * hd;
  const int64_t cache_row0 = static_cast<int64_t>(kvh) * max_ctx;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    qs[d] = q[static_cast<int64_t>(h) * hd + d];
    kn[d] = k_new[static_cast<int64_t>(kvh) * hd + d];
  }
  __syncthreads();
  if (kFuse) {
    const float pf = static_cast<float>(P);
    norm_rope_head(qs, q_norm, eps, pf, inv_freq, hd, red);
    norm_rope_head(kn, k_norm, eps, pf, inv_freq, hd, red);
  }
  if (s == 0 && h % group == 0) {
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      k_cache[(cache_row0 + P) * hd + d] = __half_as_ushort(__float2half_rn(kn[d]));
      v_cache[(cache_row0 + P) * hd + d] = __half_as_ushort(__float2half_rn(vn[d]));
    }
  }

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int nwarps = blockDim.x / 32;
  for (int t = warp; t < len; t += nwarps) {
    const int p = start + t;
    float acc = 0.0f;
    if (p == P) {
      for (int d = 2 * lane; d < hd; d += 64) {
        acc = fmaf(qs[d], kn[d], acc);
        acc = fmaf(qs[d + 1], kn[d + 1], acc);
      }
    } else {
      const __half2* kr = reinterpret_cast<const __half2*>(k_cache + (cache_row0 + p) * hd);
      for (int d = 2 * lane; d < hd; d += 64) {
        const float2 kv = __half22float2(kr[d / 2]);
        acc = fmaf(qs[d], kv.x, acc);
        acc = fmaf(qs[d + 1], kv.y, acc);
      }
    }
    acc = detail::warp_sum(acc);
    if (lane == 0) sc[t] = acc * scale;
  }
  __syncthreads();

  float m = -INFINITY;
  for (int t = threadIdx.x; t < len; t += blockDim.x) m = fmaxf(m, sc[t]);
  m = detail::block_max(m, red);
  float l = 0.0f;
  for (int t = threadIdx.x; t < len; t += blockDim.x) {
    const float e = expf(sc[t] - m);
    sc[t] = e;
    l += e;
  }
  l = detail::block_sum(l, red);  // its __syncthreads also publishes sc

  float* o = ws_o + (static_cast<int64_t>(h) * nsplit + s) * hd;
  for (int d2 = threadIdx.x; d2 < hd / 2; d2 += blockDim.x) {
    float ax = 0.0f, ay = 0.0f;
    for (int t = 0; t < len; ++t) {
      const int p = start + t;
      float2 vv;
      if (p == P) {
        vv = make_float2(vn[2 * d2], vn[2 * d2 + 1]);
      } else {
        vv = __half22float2(reinterpret_cast<const __half2*>(v_cache + (cache_row0 + p) * hd)[d2]);
      }
      ax = fmaf(sc[t], vv.x, ax);
      ay = fmaf(sc[t], vv.y, ay);
    }
    o[2 * d2] = ax;
    o[2 * d2 + 1] = ay;
  }
  if (threadIdx.x == 0) {
    ws_ml[(static_cast<int64_t>(h) * nsplit + s) * 2] = m;
    ws_ml[(static_cast<int64_t>(h) * nsplit + s) * 2 + 1] = l;
  }
}

template <bool kBatch>
__global__ void attn_decode_combine(const int32_t* __restrict__ pos, int hd, int max_ctx,
                                    int nsplit, const float* __restrict__ ws_o,
                                    const float* __restrict__ ws_ml, float* __restrict__ out) {
  if constexpr (kBatch) {  // sequence b = blockIdx.y
    const int64_t b = blockIdx.y;
    const int64_t n_heads = gridDim.x;
    pos += b;
    ws_o += b * n_heads * nsplit * hd;
    ws_ml += b * n_heads * nsplit * 2;
    out += b * n_heads * hd;
  }
  const int h = blockIdx.x;
  const int P = *pos;
  float* oh = out + static_cast<int64_t>(h) * hd;
  if (P < 0 || P >= max_ctx) {
    for (int d = threadIdx.x; d < hd; d += blockDim.x) oh[d] = __int_as_float(0x7fc00000);
    return;
  }
  const int used = (P + 1 + kAttnChunk - 1) / kAttnChunk;
  const float* ml = ws_ml + static_cast<int64_t>(h) * nsplit * 2;
  float M = -INFINITY;
  for (int s = 0; s < used; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.0f;
  for (int s = 0; s < used; ++s) L = fmaf(expf(ml[2 * s] - M), ml[2 * s + 1], L);
  const float inv = 1.0f / L;
  const float* o = ws_o + static_cast<int64_t>(h) * nsplit * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < used; ++s)
      acc = fmaf(expf(ml[2 * s] - M), o[static_cast<int64_t>(s) * hd + d], acc);
    oh[d] = acc * inv;
  }
}

int64_t n_splits(int64_t max_ctx) { return (max_ctx + kAttnChunk - 1) / kAttnChunk; }

// ---- one-launch cluster kernel (sm_90) ---------------------------------------------------------

constexpr int kClusterBlocks = 8;
// Positions per chunk, kKvPerLane per lane. 32 rather than 64: a chunk is the serial work of one
// block, and at the short contexts of most decode steps (P < 256) a chunk of 32 spreads P over
// P / 32 + 1 ranks instead of P / 64 + 1 (tg128 on the H100: see docs/performance.md).
constexpr int kKvChunk = 32;
constexpr int kKvPerLane = kKvChunk / 32;
static_assert(kKvChunk % 32 == 0, "whole positions per lane");
constexpr int kMaxGroup = 16;
constexpr int kMaxHd = 256;

struct ClusterSmem {
  // Offsets (bytes) into the dynamic shared memory, from hd and group.
  int kbuf, vbuf, qs, kn, vn, cs, po, pml, total;
};

__host__ __device__ inline ClusterSmem cluster_smem(int hd, int group) {
  ClusterSmem l{};
  int o = 0;
  l.kbuf = o;  // two chunk buffers each: the next chunk streams in while this one is scored
  o += 2 * kKvChunk * hd * 2;
  l.vbuf = o;
  o += 2 * kKvChunk * hd * 2;
  l.qs = o;
  o += group * hd * 4;
  l.kn = o;
  o += hd * 4;
  l.vn = o;
  o += hd * 4;
  l.cs = o;
  o += hd * 4;  // hd/2 (cos, sin) pairs
  l.po = o;
  o += group * hd * 4;
  l.pml = o;
  o += group * 2 * 4;
  l.total = (o + 15) / 16 * 16;
  return l;
}

// Copies the cached rows [p0, p1) of kv head `kvh` into kbuf (swizzled) and vbuf.
__device__ __forceinline__ void issue_kv_chunk(const uint16_t* __restrict__ k_cache,
                                               const uint16_t* __restrict__ v_cache,
                                               int64_t row0, int hd, int p0, int p1,
                                               uint8_t* kbuf, uint8_t* vbuf) {
  const int units = hd / 8;  // 16-byte units per row
  const int n = (p1 - p0) * units;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int t = i / units, u = i % units;
    const int64_t src = (row0 + p0 + t) * hd + u * 8;
    detail::cp_async16(kbuf + (t * units + (u ^ (t & 7))) * 16, k_cache + src);
    detail::cp_async16(vbuf + (t * units + u) * 16, v_cache + src);
  }
  detail::cp_async_commit();
}

// kBatch: sequence b = blockIdx.y (the cluster spans x only), as attn_decode_partial.
template <bool kBatch>
__global__ void __launch_bounds__(kMaxGroup * 32)
    attn_decode_cluster(const float* __restrict__ q_raw, const float* __restrict__ k_raw,
                        const float* __restrict__ v_new, const float* __restrict__ q_norm,
                        const float* __restrict__ k_norm, float eps,
                        const float* __restrict__ inv_freq, uint16_t* __restrict__ k_cache,
                        uint16_t* __restrict__ v_cache, const int32_t* __restrict__ pos, int group,
                        int hd, int max_ctx, float scale, float* __restrict__ out,
                        int64_t seq_stride) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kBatch) {
    const int64_t b = blockIdx.y;
    const int64_t n_kv = gridDim.x / kClusterBlocks;
    q_raw += b * n_kv * group * hd;
    k_raw += b * n_kv * hd;
    v_new += b * n_kv * hd;
    out += b * n_kv * group * hd;
    k_cache += b * seq_stride;
    v_cache += b * seq_stride;
    pos += b;
  }
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ float4 smem4[];
  uint8_t* sm = reinterpret_cast<uint8_t*>(smem4);
  const ClusterSmem L = cluster_smem(hd, group);
  uint8_t* kbuf = sm + L.kbuf;
  uint8_t* vbuf = sm + L.vbuf;
  float* qs = reinterpret_cast<float*>(sm + L.qs);
  float* kn = reinterpret_cast<float*>(sm + L.kn);
  float* vn = reinterpret_cast<float*>(sm + L.vn);
  float2* cs = reinterpret_cast<float2*>(sm + L.cs);
  float* po = reinterpret_cast<float*>(sm + L.po);
  float* pml = reinterpret_cast<float*>(sm + L.pml);

  const int rank = static_cast<int>(cluster.block_rank());
  const int kvh = blockIdx.x / kClusterBlocks;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int half = hd / 2;
  const int64_t row0 = static_cast<int64_t>(kvh) * max_ctx;
  const int P = __ldcg(pos);  // written by an earlier step: safe before pdl_wait
  const bool ok = P >= 0 && P < max_ctx;

  // ---- before the wait: the first chunk's cached rows, the RoPE table ----
  if (ok && rank * kKvChunk < P) {
    issue_kv_chunk(k_cache, v_cache, row0, hd, rank * kKvChunk, min(P, (rank + 1) * kKvChunk),
                   kbuf, vbuf);
  }
  if (ok) {
    const float pf = static_cast<float>(P);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      const float angle = pf * inv_freq[i];
      double sd, cd;
      sincos(static_cast<double>(angle), &sd, &cd);
      cs[i] = make_float2(static_cast<float>(cd), static_cast<float>(sd));
    }
  }
  detail::pdl_wait();

  float m_run = -INFINITY, l_run = 0.0f;
  float4 o_run[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
  const int h = kvh * group + warp;  // this warp's query head
  if (ok) {
    // ---- RMSNorm of q (warp = head) and k (warp 0), v copied ----
    float vals[kMaxHd / 32];
    const int per = hd / 32;
    for (int pass = 0; pass < (warp == 0 ? 2 : 1); ++pass) {
      const float* src = pass == 0 ? q_raw + static_cast<int64_t>(h) * hd
                                   : k_raw + static_cast<int64_t>(kvh) * hd;
      const float* w = pass == 0 ? q_norm : k_norm;
      float* dst = pass == 0 ? qs + warp * hd : kn;
      float ss = 0.0f;
#pragma unroll
      for (int i = 0; i < kMaxHd / 32; ++i) {
        if (i < per) {
          vals[i] = src[lane + 32 * i];
          ss = fmaf(vals[i], vals[i], ss);
        }
      }
      ss = detail::warp_sum(ss);
      const float r = 1.0f / sqrtf(ss / static_cast<float>(hd) + eps);
#pragma unroll
      for (int i = 0; i < kMaxHd / 32; ++i) {
        if (i < per) dst[lane + 32 * i] = w[lane + 32 * i] * (vals[i] * r);
      }
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) vn[d] = v_new[static_cast<int64_t>(kvh) * hd + d];
    __syncthreads();  // cs, qs, kn visible
    // ---- NEOX RoPE in place (launch_rope_neox's arithmetic) ----
    for (int pass = 0; pass < (warp == 0 ? 2 : 1); ++pass) {
      float* v = pass == 0 ? qs + warp * hd : kn;
      for (int i = lane; i < half; i += 32) {
        const float c = cs[i].x, sn = cs[i].y;
        const float a = v[i], b = v[half + i];
        v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
        v[half + i] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn));
      }
    }
    __syncthreads();  // rotated q, k visible
    // ---- store this token's k/v in the cache: the block whose chunks hold position P ----
    if ((P / kKvChunk) % kClusterBlocks == rank) {
      for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        k_cache[(row0 + P) * hd + d] = __half_as_ushort(__float2half_rn(kn[d]));
        v_cache[(row0 + P) * hd + d] = __half_as_ushort(__float2half_rn(vn[d]));
      }
    }

    // ---- chunks r, r + 8, ... ----
    const float* qh = qs + warp * hd;
    const int units = hd / 8;
    // This token's score (its key in float32, as the CPU engine attends it), by the whole warp.
    float s_cur = 0.0f;
    for (int d = lane; d < hd; d += 32) s_cur = fmaf(qh[d], kn[d], s_cur);
    s_cur = detail::warp_sum(s_cur) * scale;
    const int buf_bytes = kKvChunk * hd * 2;
    for (int c = rank, it = 0; c * kKvChunk <= P; c += kClusterBlocks, ++it) {
      const int p0 = c * kKvChunk;
      const int len = min(kKvChunk, P + 1 - p0);
      // The next chunk of this block into the other buffer (freed by the previous iteration's
      // closing barrier), then wait for this one only.
      const int cn = c + kClusterBlocks;
      if (cn * kKvChunk < P) {
        issue_kv_chunk(k_cache, v_cache, row0, hd, cn * kKvChunk, min(P, (cn + 1) * kKvChunk),
                       kbuf + ((it + 1) & 1) * buf_bytes, vbuf + ((it + 1) & 1) * buf_bytes);
        detail::cp_async_wait<1>();
      } else {
        detail::cp_async_wait<0>();
      }
      __syncthreads();  // chunk c in its buffers
      const uint8_t* kb = kbuf + (it & 1) * buf_bytes;
      const uint8_t* vb = vbuf + (it & 1) * buf_bytes;
      // scores: lane -> positions p0 + lane + 32 j, j < kKvPerLane
      float sc[kKvPerLane];
#pragma unroll
      for (int j = 0; j < kKvPerLane; ++j) {
        const int t = lane + 32 * j;
        const int p = p0 + t;
        float acc = 0.0f;
        if (t < len && p < P) {
          const uint8_t* krow = kb + t * units * 16;
          for (int u = 0; u < units; ++u) {
            const uint4 kw = *reinterpret_cast<const uint4*>(krow + ((u ^ (t & 7)) * 16));
            const float4 qa = *reinterpret_cast<const float4*>(qh + 8 * u);
            const float4 qb = *reinterpret_cast<const float4*>(qh + 8 * u + 4);
            const float2 k0 = __half22float2(*reinterpret_cast<const __half2*>(&kw.x));
            const float2 k1 = __half22float2(*reinterpret_cast<const __half2*>(&kw.y));
            const float2 k2 = __half22float2(*reinterpret_cast<const __half2*>(&kw.z));
            const float2 k3 = __half22float2(*reinterpret_cast<const __half2*>(&kw.w));
            acc = fmaf(qa.x, k0.x, acc);
            acc = fmaf(qa.y, k0.y, acc);
            acc = fmaf(qa.z, k1.x, acc);
            acc = fmaf(qa.w, k1.y, acc);
            acc = fmaf(qb.x, k2.x, acc);
            acc = fmaf(qb.y, k2.y, acc);
            acc = fmaf(qb.z, k3.x, acc);
            acc = fmaf(qb.w, k3.y, acc);
          }
          sc[j] = acc * scale;
        } else if (t < len) {  // p == P
          sc[j] = s_cur;
        } else {
          sc[j] = -INFINITY;
        }
      }
      float m_c = sc[0];
#pragma unroll
      for (int j = 1; j < kKvPerLane; ++j) m_c = fmaxf(m_c, sc[j]);
      m_c = detail::warp_max(m_c);
      const float m_new = fmaxf(m_run, m_c);
      const float alpha = expf(m_run - m_new);
      float e[kKvPerLane];
      float e_sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kKvPerLane; ++j) {
        e[j] = expf(sc[j] - m_new);
        e_sum += e[j];
      }
      l_run = fmaf(l_run, alpha, detail::warp_sum(e_sum));
      m_run = m_new;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        o_run[i].x *= alpha;
        o_run[i].y *= alpha;
        o_run[i].z *= alpha;
        o_run[i].w *= alpha;
      }
#pragma unroll
      for (int j = 0; j < kKvPerLane; ++j) {
        const int t_end = min(32, len - 32 * j);
        for (int tt = 0; tt < t_end; ++tt) {
          const int t = 32 * j + tt;
          const float pt = __shfl_sync(0xffffffffu, e[j], tt);
          const bool cur = p0 + t == P;
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int d = 4 * (lane + 32 * i);
            if (d < hd) {
              float4 vv;
              if (cur) {
                vv = *reinterpret_cast<const float4*>(vn + d);
              } else {
                const uint2 w2 = *reinterpret_cast<const uint2*>(vb + (t * hd + d) * 2);
                const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&w2.x));
                const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&w2.y));
                vv = make_float4(a.x, a.y, b.x, b.y);
              }
              o_run[i].x = fmaf(pt, vv.x, o_run[i].x);
              o_run[i].y = fmaf(pt, vv.y, o_run[i].y);
              o_run[i].z = fmaf(pt, vv.z, o_run[i].z);
              o_run[i].w = fmaf(pt, vv.w, o_run[i].w);
            }
          }
        }
      }
      __syncthreads();  // everyone done with this chunk's buffers before they are refilled
    }
  }
  // ---- this block's partial: (m, l, unnormalized o) per head ----
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int d = 4 * (lane + 32 * i);
    if (d < hd) *reinterpret_cast<float4*>(po + warp * hd + d) = o_run[i];
  }
  if (lane == 0) {
    pml[2 * warp] = m_run;
    pml[2 * warp + 1] = l_run;
  }
  detail::pdl_trigger();
  cluster.sync();
  // ---- merge in rank order: rank r finishes heads r, r + 8, ... of the group ----
  // Ranks past the last chunk hold (-inf, 0, 0) and would add exact zeros: skipped.
  const int ranks = ok ? min(kClusterBlocks, P / kKvChunk + 1) : 0;
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
    const int hh = i / hd, d = i % hd;
    if (hh % kClusterBlocks != rank) continue;
    float* oh = out + (static_cast<int64_t>(kvh) * group + hh) * hd;
    if (!ok) {
      oh[d] = __int_as_float(0x7fc00000);
      continue;
    }
    float M = -INFINITY;
    for (int r = 0; r < ranks; ++r) {
      M = fmaxf(M, cluster.map_shared_rank(pml, r)[2 * hh]);
    }
    float Lsum = 0.0f, acc = 0.0f;
    for (int r = 0; r < ranks; ++r) {
      const float* ml = cluster.map_shared_rank(pml, r);
      const float e = expf(ml[2 * hh] - M);
      Lsum = fmaf(e, ml[2 * hh + 1], Lsum);
      acc = fmaf(e, cluster.map_shared_rank(po, r)[hh * hd + d], acc);
    }
    oh[d] = acc * (1.0f / Lsum);
  }
  cluster.sync();  // no block leaves while another still reads its shared memory
#endif
}

bool cluster_path_ok(int64_t n_heads, int64_t n_kv, int64_t head_dim) {
  const int64_t group = n_heads / n_kv;
  if (head_dim % 64 != 0 || head_dim > kMaxHd || group < 1 || group > kMaxGroup) return false;
  // Per device: the shared-memory opt-in belongs to each device's context.
  static detail::PerDevice<bool> ok;
  return ok.get([](int dev) {
    int major = 0;
    const bool yes =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        major >= 9 &&
        cudaFuncSetAttribute(reinterpret_cast<const void*>(&attn_decode_cluster<false>),
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             cluster_smem(kMaxHd, kMaxGroup).total) == cudaSuccess &&
        cudaFuncSetAttribute(reinterpret_cast<const void*>(&attn_decode_cluster<true>),
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             cluster_smem(kMaxHd, kMaxGroup).total) == cudaSuccess;
    if (!yes) cudaGetLastError();
    return yes;
  });
}

}  // namespace

size_t attention_decode_workspace_bytes(int64_t n_heads, int64_t head_dim, int64_t max_ctx) {
  return static_cast<size_t>(n_heads * n_splits(max_ctx) * (head_dim + 2)) * sizeof(float);
}

size_t attention_decode_batch_workspace_bytes(int64_t sequences, int64_t n_heads, int64_t head_dim,
                                              int64_t max_ctx) {
  return static_cast<size_t>(sequences) *
         attention_decode_workspace_bytes(n_heads, head_dim, max_ctx);
}

namespace {

bool attention_args_ok(int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t max_ctx) {
  return n_heads > 0 && n_kv > 0 && n_heads % n_kv == 0 && n_heads <= 65535 && head_dim > 0 &&
         head_dim % 2 == 0 && head_dim <= 256 && max_ctx > 0 && max_ctx <= (int64_t{1} << 24);
}

// The two-launch path; batch > 0: `batch` sequences (grid z / y), else the single-sequence
// kernels exactly as before.
template <bool kBatch>
cudaError_t attention_impl(const float* q, const float* k_new, const float* v_new,
                           uint16_t* k_cache, uint16_t* v_cache, const int32_t* pos,
                           int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t max_ctx,
                           void* workspace, float* out, const float* q_norm, const float* k_norm,
                           float eps, const float* inv_freq, int64_t batch, int64_t seq_stride,
                           cudaStream_t stream) {
  if (!attention_args_ok(n_heads, n_kv, head_dim, max_ctx) || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t ns = n_splits(max_ctx);
  float* ws_o = static_cast<float*>(workspace);
  // Batched: each sequence's slice is laid out as one single-sequence workspace.
  float* ws_ml = ws_o + n_heads * ns * head_dim * (kBatch ? batch : 1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const size_t smem = static_cast<size_t>(2 * head_dim + kAttnChunk) * sizeof(float);
  const unsigned nb = kBatch ? static_cast<unsigned>(batch) : 1u;
  const dim3 grid(static_cast<unsigned>(n_heads), static_cast<unsigned>(ns), nb);
  const int group = static_cast<int>(n_heads / n_kv);
  const int hd = static_cast<int>(head_dim);
  const int mc = static_cast<int>(max_ctx);
  if (q_norm != nullptr) {
    attn_decode_partial<true, kBatch><<<grid, kThreads, smem, stream>>>(
        q, k_new, v_new, k_cache, v_cache, pos, group, hd, mc, scale, ws_o, ws_ml, q_norm, k_norm,
        eps, inv_freq, seq_stride);
  } else {
    attn_decode_partial<false, kBatch><<<grid, kThreads, smem, stream>>>(
        q, k_new, v_new, k_cache, v_cache, pos, group, hd, mc, scale, ws_o, ws_ml, nullptr, nullptr,
        0.0f, nullptr, seq_stride);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  attn_decode_combine<kBatch><<<dim3(static_cast<unsigned>(n_heads), nb), kThreads, 0, stream>>>(
      pos, hd, mc, static_cast<int>(ns), ws_o, ws_ml, out);
  return cudaGetLastError();
}

template <bool kBatch>
cudaError_t launch_cluster(const float* q_raw, const float* k_raw, const float* v_new,
                           const float* q_norm, const float* k_norm, float eps,
                           const float* inv_freq, uint16_t* k_cache, uint16_t* v_cache,
                           const int32_t* pos, int64_t n_heads, int64_t n_kv, int64_t head_dim,
                           int64_t max_ctx, float* out, int64_t batch, int64_t seq_stride,
                           cudaStream_t stream) {
  const int group = static_cast<int>(n_heads / n_kv);
  const int hd = static_cast<int>(head_dim);
  return detail::launch_kernel(
      &attn_decode_cluster<kBatch>,
      dim3(static_cast<unsigned>(n_kv * kClusterBlocks), static_cast<unsigned>(batch)),
      dim3(static_cast<unsigned>(32 * group)), static_cast<size_t>(cluster_smem(hd, group).total),
      stream, kClusterBlocks, q_raw, k_raw, v_new, q_norm, k_norm, eps, inv_freq, k_cache, v_cache,
      pos, group, hd, static_cast<int>(max_ctx), 1.0f / std::sqrt(static_cast<float>(head_dim)),
      out, seq_stride);
}

bool batch_args_ok(int64_t batch, int64_t n_kv, int64_t head_dim, int64_t max_ctx,
                   int64_t seq_stride) {
  return batch >= 1 && batch <= 65535 && seq_stride >= n_kv * max_ctx * head_dim;
}

}  // namespace

cudaError_t launch_attention_decode(const float* q, const float* k_new, const float* v_new,
                                    uint16_t* k_cache, uint16_t* v_cache, const int32_t* pos,
                                    int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                    int64_t max_ctx, void* workspace, float* out,
                                    cudaStream_t stream) {
  return attention_impl<false>(q, k_new, v_new, k_cache, v_cache, pos, n_heads, n_kv, head_dim,
                               max_ctx, workspace, out, nullptr, nullptr, 0.0f, nullptr, 1, 0,
                               stream);
}

cudaError_t launch_attention_decode_qknorm_rope(const float* q_raw, const float* k_raw,
                                                const float* v_new, const float* q_norm,
                                                const float* k_norm, float eps,
                                                const float* inv_freq, uint16_t* k_cache,
                                                uint16_t* v_cache, const int32_t* pos,
                                                int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                                int64_t max_ctx, void* workspace, float* out,
                                                cudaStream_t stream) {
  if (q_norm == nullptr || k_norm == nullptr || inv_freq == nullptr) return cudaErrorInvalidValue;
  if (attention_args_ok(n_heads, n_kv, head_dim, max_ctx) &&
      cluster_path_ok(n_heads, n_kv, head_dim)) {
    return launch_cluster<false>(q_raw, k_raw, v_new, q_norm, k_norm, eps, inv_freq, k_cache,
                                 v_cache, pos, n_heads, n_kv, head_dim, max_ctx, out, 1, 0, stream);
  }
  return attention_impl<false>(q_raw, k_raw, v_new, k_cache, v_cache, pos, n_heads, n_kv, head_dim,
                               max_ctx, workspace, out, q_norm, k_norm, eps, inv_freq, 1, 0,
                               stream);
}

cudaError_t launch_attention_decode_batch(const float* q, const float* k_new, const float* v_new,
                                          uint16_t* k_cache, uint16_t* v_cache, int64_t seq_stride,
                                          const int32_t* pos, int64_t batch, int64_t n_heads,
                                          int64_t n_kv, int64_t head_dim, int64_t max_ctx,
                                          void* workspace, float* out, cudaStream_t stream) {
  if (!batch_args_ok(batch, n_kv, head_dim, max_ctx, seq_stride)) return cudaErrorInvalidValue;
  return attention_impl<true>(q, k_new, v_new, k_cache, v_cache, pos, n_heads, n_kv, head_dim,
                              max_ctx, workspace, out, nullptr, nullptr, 0.0f, nullptr, batch,
                              seq_stride, stream);
}

cudaError_t launch_attention_decode_qknorm_rope_batch(
    const float* q_raw, const float* k_raw, const float* v_new, const float* q_norm,
    const float* k_norm, float eps, const float* inv_freq, uint16_t* k_cache, uint16_t* v_cache,
    int64_t seq_stride, const int32_t* pos, int64_t batch, int64_t n_heads, int64_t n_kv,
    int64_t head_dim, int64_t max_ctx, void* workspace, float* out, cudaStream_t stream) {
  if (q_norm == nullptr || k_norm == nullptr || inv_freq == nullptr ||
      !batch_args_ok(batch, n_kv, head_dim, max_ctx, seq_stride)) {
    return cudaErrorInvalidValue;
  }
  if (attention_args_ok(n_heads, n_kv, head_dim, max_ctx) &&
      cluster_path_ok(n_heads, n_kv, head_dim)) {
    return launch_cluster<true>(q_raw, k_raw, v_new, q_norm, k_norm, eps, inv_freq, k_cache,
                                v_cache, pos, n_heads, n_kv, head_dim, max_ctx, out, batch,
                                seq_stride, stream);
  }
  return attention_impl<true>(q_raw, k_raw, v_new, k_cache, v_cache, pos, n_heads, n_kv, head_dim,
                              max_ctx, workspace, out, q_norm, k_norm, eps, inv_freq, batch,
                              seq_stride, stream);
}

}  // namespace ktune::cuda
