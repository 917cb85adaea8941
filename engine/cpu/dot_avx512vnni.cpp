// AVX-512 VNNI kernels (Ice Lake-SP, Sapphire Rapids, Zen 4): the decode hot path. One
// VPDPBUSD does 64 u8×s8 products and their sums into 16 int32 lanes, so a pair of Q4_0 blocks
// costs about 5 vector instructions per row (masked broadcast load, and, dpbusd, convert, fma)
// plus a share of the per-group scale work. The zmm tile loop is in dot_avx512_tiles.h, a ymm
// variant (faster on AMD, see use_ymm_vnni) in dot_ymm_tiles.h; the float dots and the
// activation quantizer are the AVX-512 ones.
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
};

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
        ymm_dots ? ymm::matmul<Q4YmmVnniOps> : avx512::matmul<Q4VnniOps>,
        ymm_dots ? ymm::matmul<Q8YmmVnniOps> : avx512::matmul<Q8VnniOps>,
        avx512_kernels().f16,
        avx512_kernels().bf16,
        avx512_kernels().f32,
        avx512_kernels().quantize_q8_0,
    };
  }();
  return set;
}

}  // namespace ktune::cpu::detail
