// AVX-512 VNNI kernels (Ice Lake-SP, Sapphire Rapids, Zen 4): the decode hot path. One
// VPDPBUSD does 64 u8×s8 products and their sums into 16 int32 lanes, so a pair of Q4_0 blocks
// costs about 5 vector instructions per row (masked broadcast load, and, dpbusd, convert, fma)
// plus a share of the per-group scale work. The zmm tile loop is in dot_avx512_tiles.h, a ymm
// variant (faster on AMD, see use_ymm_vnni) in dot_ymm_tiles.h; the float dots and the
// activation quantizer are the AVX-512 ones.
#include <cstring>
#include <vector>

#include "cpu/dot_avx512_tiles.h"
#include "cpu/dot_kernels.h"
#include "cpu/dot_ymm_tiles.h"
#include "ktune/engine/quant.h"

#if !defined(__AVX512VNNI__)
#error "dot_avx512vnni.cpp needs -mavx512vnni (engine/CMakeLists.txt adds it by file name)"
#endif

namespace ktune::cpu::detail {
namespace {

struct Q4VnniOps {
  static constexpr int64_t kWeightBlockBytes = sizeof(BlockQ4_0);
  // Masks per 16-byte lane: [0x0F (low nibble) | 0xF0 (high nibble) | 0x0F | 0xF0].
  static __m512i nibble_mask() {
    return _mm512_broadcast_i64x4(_mm256_setr_epi64x(
        0x0F0F0F0F0F0F0F0FLL, 0x0F0F0F0F0F0F0F0FLL, static_cast<long long>(0xF0F0F0F0F0F0F0F0ULL),
        static_cast<long long>(0xF0F0F0F0F0F0F0F0ULL)));
  }
  // [b0 b0 b1 b1] masked: bytes 0..15 hold q0..q15 + 8, bytes 16..31 hold 16·(q16..q31 + 8), so
  // the pair is in natural weight order without a shift; the 16× is undone in act_scale.
  static __m512i load_w(const uint8_t* qs, bool two) {
    const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    __m512i v;
    if (two) {
      const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + kWeightBlockBytes));
      v = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(b0), 0xFF00, b1);
    } else {
      v = _mm512_maskz_broadcast_i32x4(0x00FF, b0);
    }
    return _mm512_and_si512(v, nibble_mask());
  }
  // Excess of the stored offset: 8 · sum(a) in low-nibble lanes, 16 · 8 = 128 · sum(a) in
  // high-nibble lanes. Returned negated: it is the starting value of the row's dpbusd.
  static __m512i neg_corr(__m512i a) {
    const __m512i k = _mm512_broadcast_i64x4(_mm256_setr_epi64x(
        0x0808080808080808LL, 0x0808080808080808LL, static_cast<long long>(0x8080808080808080ULL),
        static_cast<long long>(0x8080808080808080ULL)));
    return _mm512_sub_epi32(_mm512_setzero_si512(),
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), k, a));
  }
  static __m512i dot(__m512i nc, __m512i w, __m512i a) { return _mm512_dpbusd_epi32(nc, w, a); }
  // [d0..d3 | d0..d3] -> [d0..d3 | d0/16..d3/16] for the high-nibble lanes (exact).
  static __m256 act_scale(__m256 d) {
    return _mm256_mul_ps(d, _mm256_setr_ps(1, 1, 1, 1, 0.0625f, 0.0625f, 0.0625f, 0.0625f));
  }
  // Lanes 0-3: block 2p low, 4-7: block 2p high, 8-11: block 2p+1 low, 12-15: 2p+1 high.
  static __m512i scale_index(int pair) {
    const int b = 2 * pair;
    return _mm512_setr_epi32(b, b, b, b, b + 4, b + 4, b + 4, b + 4, b + 1, b + 1, b + 1, b + 1,
                             b + 5, b + 5, b + 5, b + 5);
  }
};

struct Q8VnniOps {
  static constexpr int64_t kWeightBlockBytes = sizeof(BlockQ8_0);
  // q xor 0x80 = q + 128, unsigned; the excess 128 · sum(a) is subtracted through neg_corr.
  static __m512i load_w(const uint8_t* qs, bool two) {
    return _mm512_xor_si512(avx512::load_act_pair(qs, two), _mm512_set1_epi8(-128));
  }
  static __m512i neg_corr(__m512i a) {
    return _mm512_sub_epi32(_mm512_setzero_si512(),
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), a));
  }
  static __m512i dot(__m512i nc, __m512i w, __m512i a) { return _mm512_dpbusd_epi32(nc, w, a); }
  static __m256 act_scale(__m256 d) { return d; }
  static __m512i scale_index(int pair) { return avx512::pair_scale_index(pair); }
};

// The same dots on ymm (AVX512-VL forms of VPDPBUSD), one block per vector.
struct Q4YmmVnniOps {
  static constexpr int64_t kWeightBlockBytes = sizeof(BlockQ4_0);
  // [b b] masked to [low nibbles | high nibbles · 16]: natural order, no shift.
  static __m256i load_w(const uint8_t* qs) {
    const __m256i v =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    return _mm256_and_si256(v, _mm256_setr_epi64x(0x0F0F0F0F0F0F0F0FLL, 0x0F0F0F0F0F0F0F0FLL,
                                                  static_cast<long long>(0xF0F0F0F0F0F0F0F0ULL),
                                                  static_cast<long long>(0xF0F0F0F0F0F0F0F0ULL)));
  }
  static __m256i neg_corr(__m256i a) {
    const __m256i k = _mm256_setr_epi64x(0x0808080808080808LL, 0x0808080808080808LL,
                                         static_cast<long long>(0x8080808080808080ULL),
                                         static_cast<long long>(0x8080808080808080ULL));
    return _mm256_sub_epi32(_mm256_setzero_si256(),
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), k, a));
  }
  static __m256i dot(__m256i nc, __m256i w, __m256i a) { return _mm256_dpbusd_epi32(nc, w, a); }
  // [s0..s3 | s0/16..s3/16]; lanes 0-3 of block b take s_b, lanes 4-7 (high nibbles) s_b/16.
  static __m256 scale8(__m128 s4) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(s4), _mm_mul_ps(s4, _mm_set1_ps(0.0625f)),
                                1);
  }
  static __m256i lane_index(int b) {
    return _mm256_setr_epi32(b, b, b, b, b + 4, b + 4, b + 4, b + 4);
  }
  // Packed lane scales of one activation block: [da ×4 | da/16 ×4]. dw · (da/16) equals
  // (dw · da)/16 (scale8's order) bit for bit: a power-of-two factor that cannot underflow or
  // overflow here (fp16 scales) commutes with rounding.
  static __m256 act_lanes(__m256 da) {
    return _mm256_mul_ps(da, _mm256_setr_ps(1, 1, 1, 1, 0.0625f, 0.0625f, 0.0625f, 0.0625f));
  }
};

struct Q8YmmVnniOps {
  static constexpr int64_t kWeightBlockBytes = sizeof(BlockQ8_0);
  static __m256i load_w(const uint8_t* qs) {
    return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs)),
                            _mm256_set1_epi8(-128));
  }
  static __m256i neg_corr(__m256i a) {
    return _mm256_sub_epi32(_mm256_setzero_si256(),
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), a));
  }
  static __m256i dot(__m256i nc, __m256i w, __m256i a) { return _mm256_dpbusd_epi32(nc, w, a); }
  static __m256 scale8(__m128 s4) { return _mm256_castps128_ps256(s4); }
  static __m256i lane_index(int b) { return _mm256_set1_epi32(b); }
  static __m256 act_lanes(__m256 da) { return da; }
};

// Prefill on ymm (AMD): the tokens are packed once per call, per block 96 bytes [a | -K·sum(a) |
// the 8 lane scales of da], and 4 rows × 4 tokens tiles (32 ymm registers under AVX512-VL) do
// 4 ops per (row, token, block): dpbusd, convert, scale multiply, fma. Per (row, token) the float
// work is ymm::tile<Ops, 1, 1>'s (vec_dot): same lane products, same fma order, same hsum.
namespace ymmp {
constexpr int64_t kPacked = 96;

template <class Ops>
void pack(int64_t nb, const uint8_t* A, int64_t as, int64_t ntok, uint8_t* P, int64_t ps) {
  for (int64_t t = 0; t < ntok; ++t) {
    const uint8_t* ar = A + t * as;
    uint8_t* q = P + t * ps;
    for (int64_t b = 0; b < nb; ++b, ar += ymm::kActBytes, q += kPacked) {
      uint16_t d;
      std::memcpy(&d, ar, sizeof(d));
      const __m256 da = _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(d)));
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar + 2));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), a);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32), Ops::neg_corr(a));
      _mm256_storeu_ps(reinterpret_cast<float*>(q + 64), Ops::act_lanes(da));
    }
  }
}

template <class Ops, int R, int C>
inline void tile(int64_t nb, const uint8_t* W, int64_t ws, const uint8_t* P, int64_t ps, float* Y,
                 int64_t ldy) {
  constexpr int64_t kWB = Ops::kWeightBlockBytes;
  __m256 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  const uint8_t* wr[R];
  const uint8_t* pa[C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wr[r] = W + r * ws;
#pragma GCC unroll 8
  for (int t = 0; t < C; ++t) pa[t] = P + t * ps;
  const char* pf = reinterpret_cast<const char*>(W) + R * ws;
  constexpr int64_t kPfStep = R * kWB;
  for (int64_t b = 0; b < nb; ++b) {
    if ((b & 3) == 0) {
      for (int64_t off = 0; off < 4 * kPfStep; off += 64) {
        _mm_prefetch(pf + off, KTUNE_CPU_PREFETCH_HINT);
      }
      pf += 4 * kPfStep;
    }
    __m256i w[R];
    __m256 dw[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      uint16_t d;
      std::memcpy(&d, wr[r], sizeof(d));
      dw[r] = _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(d)));
      w[r] = Ops::load_w(wr[r] + 2);
      wr[r] += kWB;
    }
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa[t]));
      const __m256i nc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa[t] + 32));
      const __m256 da = _mm256_loadu_ps(reinterpret_cast<const float*>(pa[t] + 64));
      pa[t] += kPacked;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Ops::dot(nc, w[r], a)),
                                    _mm256_mul_ps(dw[r], da), acc[r][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) Y[t * ldy + r] = ymm::hsum(acc[r][t]);
  }
}

template <class Ops, int C>
void tile_rows(int64_t nb, const uint8_t* W, int64_t ws, int64_t nrows, const uint8_t* P,
               int64_t ps, float* Y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 4 <= nrows; r += 4) tile<Ops, 4, C>(nb, W + r * ws, ws, P, ps, Y + r, ldy);
  for (; r < nrows; ++r) tile<Ops, 1, C>(nb, W + r * ws, ws, P, ps, Y + r, ldy);
}

template <class Ops>
void matmul(int64_t n, const uint8_t* W, int64_t ws, int64_t nrows, const uint8_t* A, int64_t as,
            int64_t ntok, float* Y, int64_t ldy) {
  if (ntok == 1) return ymm::matmul<Ops>(n, W, ws, nrows, A, as, ntok, Y, ldy);
  const int64_t nb = n / ymm::kQ;
  const int64_t ps = nb * kPacked;
  thread_local std::vector<uint8_t> buf;
  const size_t need = static_cast<size_t>(ntok * ps + 64);
  if (buf.size() < need) buf.resize(need);
  uint8_t* P = buf.data() + ((64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64);
  pack<Ops>(nb, A, as, ntok, P, ps);
  int64_t t = 0;
  for (; t + 4 <= ntok; t += 4)
    tile_rows<Ops, 4>(nb, W, ws, nrows, P + t * ps, ps, Y + t * ldy, ldy);
  for (; t < ntok; ++t) tile_rows<Ops, 1>(nb, W, ws, nrows, P + t * ps, ps, Y + t * ldy, ldy);
}
}  // namespace ymmp

// 512-bit or 256-bit VPDPBUSD? Measured single-thread, Q4_0 2048-wide rows in L2: on a
// Sapphire/Emerald Rapids-class Xeon zmm 19 GB/s vs ymm 12-16 GB/s; on Zen 4 (which splits zmm
// work in two) ymm 25.8 vs zmm 21.2 GB/s. So AMD gets ymm, everyone else zmm. KTUNE_VNNI_YMM=0/1
// at build time forces one (to test both on one machine).
bool use_ymm_vnni() {
#if defined(KTUNE_VNNI_YMM)
  return KTUNE_VNNI_YMM != 0;
#else
  return cpu_vendor_is_amd();
#endif
}

}  // namespace

const KernelSet& avx512vnni_kernels() {
  static const KernelSet set = [] {
    const bool ymm_dots = use_ymm_vnni();
    return KernelSet{
        ymm_dots ? ymmp::matmul<Q4YmmVnniOps> : avx512::matmul_packed<Q4VnniOps>,
        ymm_dots ? ymmp::matmul<Q8YmmVnniOps> : avx512::matmul_packed<Q8VnniOps>,
        avx512_kernels().f16,
        avx512_kernels().bf16,
        avx512_kernels().f32,
        avx512_kernels().quantize_q8_0,
    };
  }();
  return set;
}

}  // namespace ktune::cpu::detail
