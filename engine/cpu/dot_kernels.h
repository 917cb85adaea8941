// Per-ISA kernel entry points behind cpu_kernels.h's dispatcher (matvec.cpp). Each ISA file
// (dot_scalar.cpp, dot_avx2.cpp, dot_avx512.cpp, dot_avx512vnni.cpp) defines one KernelSet;
// only the dispatcher picks among them, and only for an ISA the CPU has.
#pragma once

#include <cstdint>

#include "ktune/engine/cpu_kernels.h"

namespace ktune::cpu::detail {

// Best ISA of this CPU and OS, ignoring KTUNE_ISA (cached after the first call). The dispatcher
// clamps every requested ISA to it.
Isa hardware_isa();
// True on AMD CPUs, where a few kernels prefer 256-bit vectors (see dot_avx512vnni.cpp).
bool cpu_vendor_is_amd();

// Y[t * ldy + r] = dot(weight row r, activation t) for r in [0, nrows), t in [0, ntok).
// W is row 0 of the range, rows w_stride bytes apart; activation t starts at act + t *
// act_stride bytes and is in activation_type(weight) (Q8_0 blocks or F32). One shape for
// vec_dot (1×1), matvec (nrows×1) and matmul (nrows×ntok) lets every ISA tile as it likes.
using MatmulFn = void (*)(int64_t n, const uint8_t* W, int64_t w_stride, int64_t nrows,
                          const uint8_t* act, int64_t act_stride, int64_t ntok, float* Y,
                          int64_t ldy);

// Quantizes n floats (n % 32 == 0) into Q8_0 blocks, bit-exact with quantize_row(Q8_0).
using QuantizeQ8Fn = void (*)(const float* x, void* dst, int64_t n);

struct KernelSet {
  MatmulFn q4_0;  // Q4_0 weights x Q8_0 activations
  MatmulFn q8_0;  // Q8_0 weights x Q8_0 activations
  MatmulFn f16;   // F16 weights x F32 activations
  MatmulFn bf16;  // BF16 weights x F32 activations
  MatmulFn f32;   // F32 weights x F32 activations
  QuantizeQ8Fn quantize_q8_0;
};

// K-quant weights × Q8_K activations (dot_kquant_*.cpp), a set apart so the Q4_0/Q8_0 files stay
// as they are. Isa::Avx512 without VNNI uses the AVX2 set.
struct KQuantKernelSet {
  MatmulFn q4_k;
  MatmulFn q5_k;
  MatmulFn q6_k;
  QuantizeQ8Fn quantize_q8_k;  // n % 256 == 0; bit-exact with quantize_row(Q8_K)
};

const KQuantKernelSet& scalar_kquant_kernels();
const KQuantKernelSet& avx2_kquant_kernels();
const KQuantKernelSet& avx512vnni_kquant_kernels();

// Scalar K-quant dots: per super-block the exact integer sums (scale-weighted sub-block dots,
// and for Q4_K/Q5_K the mins against Q8_K's bsums), then in float
//   sum += (fp16(d) * a.d) * sumi;  sum -= (fp16(dmin) * a.d) * summ.
float dot_q4_k_q8_k_scalar(int64_t n, const void* w, const void* a);
float dot_q5_k_q8_k_scalar(int64_t n, const void* w, const void* a);
float dot_q6_k_q8_k_scalar(int64_t n, const void* w, const void* a);

const KernelSet& scalar_kernels();
const KernelSet& avx2_kernels();
const KernelSet& avx512_kernels();
const KernelSet& avx512vnni_kernels();

// Scalar single-row dots, also used by the SIMD files for their few leftover elements.
float dot_q4_0_q8_0_scalar(int64_t n, const void* w, const void* a);
float dot_q8_0_q8_0_scalar(int64_t n, const void* w, const void* a);
float dot_f16_f32_scalar(int64_t n, const void* w, const void* a);
float dot_bf16_f32_scalar(int64_t n, const void* w, const void* a);
float dot_f32_f32_scalar(int64_t n, const void* w, const void* a);

// Runs a single-row dot over a nrows×ntok tile (for kernels without a tiled version).
template <float (*Dot)(int64_t, const void*, const void*)>
void matmul_by_rows(int64_t n, const uint8_t* W, int64_t w_stride, int64_t nrows,
                    const uint8_t* act, int64_t act_stride, int64_t ntok, float* Y, int64_t ldy) {
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t t = 0; t < ntok; ++t) {
      Y[t * ldy + r] = Dot(n, W + r * w_stride, act + t * act_stride);
    }
  }
}

}  // namespace ktune::cpu::detail
