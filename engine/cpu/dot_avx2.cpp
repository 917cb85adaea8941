// AVX2 + FMA + F16C kernels (Haswell and later, Zen 1-3). One ymm holds one 32-weight block.
// Integer dots use VPMADDUBSW (u8 × s8 -> s16 pairs) + VPMADDWD with ones (-> s32): Q4_0 keeps
// its stored unsigned nibbles (q + 8 in 0..15; 15 · 127 · 2 cannot saturate) and subtracts
// 8 · sum(a) per block, computed once per token and shared by every row of the tile; Q8_0 uses
// the sign trick (|w| × a·sign(w)). The tile loop is in dot_ymm_tiles.h.
#include "cpu/dot_kernels.h"
#include "cpu/dot_ymm_tiles.h"
#include "ktune/engine/quant.h"

namespace ktune::cpu::detail {
namespace {

using ymm::hsum;
using ymm::kQ;

inline __m256i madd_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

struct Q4Ops {
  static constexpr int64_t kWeightBlockBytes = sizeof(BlockQ4_0);
  // [b b] then the upper copy shifted by 4: bytes 0..15 = weights 0..15, 16..31 = 16..31.
  static __m256i load_w(const uint8_t* qs) {
    const __m256i v =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)),
                            _mm256_set1_epi8(0x0F));
  }
  static __m256i neg_corr(__m256i a) {
    return _mm256_sub_epi32(_mm256_setzero_si256(), madd_u8s8(_mm256_set1_epi8(8), a));
  }
  static __m256i dot(__m256i nc, __m256i w, __m256i a) {
    return _mm256_add_epi32(nc, madd_u8s8(w, a));
  }
  // Lane l of a block's accumulator needs the block's scale in every lane.
  static __m256 scale8(__m128 s4) { return _mm256_castps128_ps256(s4); }
  static __m256i lane_index(int b) { return _mm256_set1_epi32(b); }
};

struct Q8Ops {
  static constexpr int64_t kWeightBlockBytes = sizeof(BlockQ8_0);
  static __m256i load_w(const uint8_t* qs) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
  }
  static __m256i neg_corr(__m256i) { return _mm256_setzero_si256(); }
  static __m256i dot(__m256i, __m256i w, __m256i a) {
    return madd_u8s8(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w));
  }
  static __m256 scale8(__m128 s4) { return _mm256_castps128_ps256(s4); }
  static __m256i lane_index(int b) { return _mm256_set1_epi32(b); }
};

// Float dots: 32 elements per step in 4 accumulators, the last n % 8 elements by the scalar
// reference.
template <class Load>
inline float float_dot(int64_t n, const void* w, const float* a, Load load) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(load(w, i), _mm256_loadu_ps(a + i), acc0);
    acc1 = _mm256_fmadd_ps(load(w, i + 8), _mm256_loadu_ps(a + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(load(w, i + 16), _mm256_loadu_ps(a + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(load(w, i + 24), _mm256_loadu_ps(a + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(load(w, i), _mm256_loadu_ps(a + i), acc0);
  return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

float dot_f32(int64_t n, const void* w, const void* a) {
  const int64_t head = n & ~int64_t{7};
  const auto* wf = static_cast<const float*>(w);
  const auto* af = static_cast<const float*>(a);
  return float_dot(head, w, af,
                   [](const void* p, int64_t i) {
                     return _mm256_loadu_ps(static_cast<const float*>(p) + i);
                   }) +
         dot_f32_f32_scalar(n - head, wf + head, af + head);
}

float dot_f16(int64_t n, const void* w, const void* a) {
  const int64_t head = n & ~int64_t{7};
  const auto* wh = static_cast<const uint16_t*>(w);
  const auto* af = static_cast<const float*>(a);
  return float_dot(head, w, af,
                   [](const void* p, int64_t i) {
                     return _mm256_cvtph_ps(_mm_loadu_si128(
                         reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
                   }) +
         dot_f16_f32_scalar(n - head, wh + head, af + head);
}

float dot_bf16(int64_t n, const void* w, const void* a) {
  const int64_t head = n & ~int64_t{7};
  const auto* wh = static_cast<const uint16_t*>(w);
  const auto* af = static_cast<const float*>(a);
  return float_dot(head, w, af,
                   [](const void* p, int64_t i) {
                     const __m128i h = _mm_loadu_si128(
                         reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
                     return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                   }) +
         dot_bf16_f32_scalar(n - head, wh + head, af + head);
}

// Bit-exact with quantize_row(Q8_0); roundf's half-away-from-zero is rebuilt from truncation
// because the hardware's nearest mode rounds ties to even.
void quantize_q8_0(const float* x, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ8_0*>(dst);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  for (int64_t b = 0; b < n / kQ; ++b, x += kQ) {
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(x + 8 * k);
      m = _mm256_max_ps(m, _mm256_and_ps(v[k], abs_mask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    const __m256 vid = _mm256_set1_ps(id);
    __m256i q[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 s = _mm256_mul_ps(v[k], vid);
      const __m256 t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __m256 up = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(s, t), abs_mask),
                                      _mm256_set1_ps(0.5f), _CMP_GE_OQ);
      const __m256 one = _mm256_or_ps(_mm256_and_ps(s, sign_mask), _mm256_set1_ps(1.0f));
      q[k] = _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, one)));
    }
    // packs work per 128-bit lane; the final dword permute restores element order.
    const __m256i p =
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

}  // namespace

const KernelSet& avx2_kernels() {
  static const KernelSet set{
      ymm::matmul<Q4Ops>,       ymm::matmul<Q8Ops>,      matmul_by_rows<dot_f16>,
      matmul_by_rows<dot_bf16>, matmul_by_rows<dot_f32>, quantize_q8_0,
  };
  return set;
}

}  // namespace ktune::cpu::detail
