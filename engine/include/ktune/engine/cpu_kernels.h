// CPU dot-product kernels, chosen at run time by CPU features. Every optimized kernel has a
// scalar twin it is tested against.
//
// Weights stay in their storage type. Activations are converted once per matrix-vector product
// into the type the weight's kernel multiplies with (activation_type): Q8_0 blocks for Q4_0 and
// Q8_0 weights (integer dot products, as ggml does), Q8_K super-blocks for Q4_K/Q5_K/Q6_K weights
// (as ggml does too), F32 for F32/F16/BF16 weights.
//
// Every entry point taking an Isa clamps it to what this CPU has, so no call can fault with an
// illegal instruction. For a given Isa, matvec_rows and matmul_rows give bit-identical results to
// vec_dot (tiling never changes one row's order of operations), so splitting rows across threads
// or tokens across calls never changes the numbers. Use matvec_rows for decode: it reads the
// activation once per 4 rows and prefetches the next rows, about 1.5-2x vec_dot in a loop.
#pragma once

#include <cstdint>
#include <vector>

#include "ktune/engine/quant.h"

namespace ktune::cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3 };

// Best ISA this CPU and this build support. KTUNE_ISA=scalar|avx2|avx512|avx512vnni lowers it
// (never raises it above what the CPU has).
Isa detect_isa();
const char* isa_name(Isa isa);
std::vector<Isa> available_isas();  // every ISA runnable here, Scalar first

QuantType activation_type(QuantType weight);
// Converts n floats into activation_type(weight) at dst (row_bytes(activation_type, n) bytes).
void quantize_activation(QuantType weight, const float* x, void* dst, int64_t n, Isa isa);

// Dot product of one weight row (n elements of type w) with one activation row.
using VecDotFn = float (*)(int64_t n, const void* w_row, const void* act);
VecDotFn vec_dot(QuantType w, Isa isa);  // throws ktune::Error for an unsupported type

// y[r - r0] = dot(row r of W, act) for r in [r0, r1). W: rows of n elements, row_bytes(w, n) apart.
void matvec_rows(QuantType w, Isa isa, const uint8_t* W, int64_t n, int64_t r0, int64_t r1,
                 const void* act, float* y);

// Batched (prefill): for t in [0, T), r in [r0, r1): Y[t * ldy + r] = dot(row r, act_t), where
// act_t starts at act + t * act_stride bytes. Blocked so each weight row is read once per tile
// of tokens.
void matmul_rows(QuantType w, Isa isa, const uint8_t* W, int64_t n, int64_t r0, int64_t r1,
                 const uint8_t* act, int64_t act_stride, int64_t T, float* Y, int64_t ldy);

}  // namespace ktune::cpu
