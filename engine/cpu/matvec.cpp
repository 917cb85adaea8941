// The public face of the CPU kernels (cpu_kernels.h): picks the kernel set of an ISA, converts
// activations, and runs vec_dot / matvec / matmul through each set's tiled MatmulFn.
//
// Safety rule: an ISA the CPU lacks is never executed. Every entry point clamps the requested
// ISA to what the hardware has (detail::hardware_isa()), so a stale or hand-written Isa value
// degrades to a slower kernel instead of raising SIGILL.
#include <cstring>
#include <string>

#include "cpu/dot_kernels.h"
#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/error.h"

namespace ktune::cpu {
namespace {

const detail::KernelSet& kernel_set(Isa isa) {
  const Isa hw = detail::hardware_isa();
  if (isa > hw) isa = hw;
  switch (isa) {
    case Isa::Avx512Vnni:
      return detail::avx512vnni_kernels();
    case Isa::Avx512:
      return detail::avx512_kernels();
    case Isa::Avx2:
      return detail::avx2_kernels();
    case Isa::Scalar:
      break;
  }
  return detail::scalar_kernels();
}

const detail::KQuantKernelSet& kquant_set(Isa isa) {
  const Isa hw = detail::hardware_isa();
  if (isa > hw) isa = hw;
  switch (isa) {
    case Isa::Avx512Vnni:
      return detail::avx512vnni_kquant_kernels();
    case Isa::Avx512:  // AVX-512 without VNNI (Skylake-SP): the 256-bit kernels
    case Isa::Avx2:
      return detail::avx2_kquant_kernels();
    case Isa::Scalar:
      break;
  }
  return detail::scalar_kquant_kernels();
}

[[noreturn]] void throw_unsupported(QuantType w) {
  throw Error("CPU kernels", "unsupported weight type " + ggml_type_name(static_cast<uint32_t>(w)),
              "ktune's CPU kernels take F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K and Q6_K weights; "
              "convert the model to one of these");
}

detail::MatmulFn matmul_fn(QuantType w, Isa isa) {
  const detail::KernelSet& set = kernel_set(isa);
  switch (w) {
    case QuantType::Q4_0:
      return set.q4_0;
    case QuantType::Q8_0:
      return set.q8_0;
    case QuantType::F16:
      return set.f16;
    case QuantType::BF16:
      return set.bf16;
    case QuantType::F32:
      return set.f32;
    case QuantType::Q4_K:
      return kquant_set(isa).q4_k;
    case QuantType::Q5_K:
      return kquant_set(isa).q5_k;
    case QuantType::Q6_K:
      return kquant_set(isa).q6_k;
    case QuantType::Q8_K:
      break;
  }
  throw_unsupported(w);
}

// vec_dot hands out plain function pointers, so each (ISA, type) gets a 1×1 adapter over the
// set's MatmulFn. The ISA is a template argument: the adapter cannot outlive a clamp decision.
template <Isa kIsa, QuantType kType>
float dot_adapter(int64_t n, const void* w, const void* act) {
  float y = 0.0f;
  matmul_fn(kType, kIsa)(n, static_cast<const uint8_t*>(w), 0, 1, static_cast<const uint8_t*>(act),
                         0, 1, &y, 1);
  return y;
}

template <Isa kIsa>
VecDotFn dot_for_type(QuantType w) {
  switch (w) {
    case QuantType::Q4_0:
      return dot_adapter<kIsa, QuantType::Q4_0>;
    case QuantType::Q8_0:
      return dot_adapter<kIsa, QuantType::Q8_0>;
    case QuantType::F16:
      return dot_adapter<kIsa, QuantType::F16>;
    case QuantType::BF16:
      return dot_adapter<kIsa, QuantType::BF16>;
    case QuantType::F32:
      return dot_adapter<kIsa, QuantType::F32>;
    case QuantType::Q4_K:
      return dot_adapter<kIsa, QuantType::Q4_K>;
    case QuantType::Q5_K:
      return dot_adapter<kIsa, QuantType::Q5_K>;
    case QuantType::Q6_K:
      return dot_adapter<kIsa, QuantType::Q6_K>;
    case QuantType::Q8_K:
      break;
  }
  throw_unsupported(w);
}

void check_rows(int64_t n, int64_t r0, int64_t r1, const char* where) {
  if (n < 0 || r0 < 0 || r1 < r0) {
    throw Error(where,
                "bad row range [" + std::to_string(r0) + ", " + std::to_string(r1) +
                    ") or row length " + std::to_string(n),
                "pass 0 <= r0 <= r1 and n >= 0");
  }
}

}  // namespace

QuantType activation_type(QuantType weight) {
  switch (weight) {
    case QuantType::Q4_0:
    case QuantType::Q8_0:
      return QuantType::Q8_0;
    case QuantType::F16:
    case QuantType::BF16:
    case QuantType::F32:
      return QuantType::F32;
    case QuantType::Q4_K:
    case QuantType::Q5_K:
    case QuantType::Q6_K:
      return QuantType::Q8_K;
    case QuantType::Q8_K:
      break;
  }
  throw_unsupported(weight);
}

void quantize_activation(QuantType weight, const float* x, void* dst, int64_t n, Isa isa) {
  const QuantType at = activation_type(weight);
  const int64_t bytes = row_bytes(at, n);  // throws when n is not a whole number of blocks
  if (at == QuantType::F32) {
    std::memcpy(dst, x, static_cast<size_t>(bytes));
    return;
  }
  if (at == QuantType::Q8_K) {
    kquant_set(isa).quantize_q8_k(x, dst, n);
  } else {
    kernel_set(isa).quantize_q8_0(x, dst, n);
  }
}

VecDotFn vec_dot(QuantType w, Isa isa) {
  const Isa hw = detail::hardware_isa();
  if (isa > hw) isa = hw;
  switch (isa) {
    case Isa::Avx512Vnni:
      return dot_for_type<Isa::Avx512Vnni>(w);
    case Isa::Avx512:
      return dot_for_type<Isa::Avx512>(w);
    case Isa::Avx2:
      return dot_for_type<Isa::Avx2>(w);
    case Isa::Scalar:
      break;
  }
  return dot_for_type<Isa::Scalar>(w);
}

void matvec_rows(QuantType w, Isa isa, const uint8_t* W, int64_t n, int64_t r0, int64_t r1,
                 const void* act, float* y) {
  check_rows(n, r0, r1, "matvec_rows");
  const int64_t rb = row_bytes(w, n);
  if (r1 == r0) return;
  matmul_fn(w, isa)(n, W + r0 * rb, rb, r1 - r0, static_cast<const uint8_t*>(act), 0, 1, y, 0);
}

void matmul_rows(QuantType w, Isa isa, const uint8_t* W, int64_t n, int64_t r0, int64_t r1,
                 const uint8_t* act, int64_t act_stride, int64_t T, float* Y, int64_t ldy) {
  check_rows(n, r0, r1, "matmul_rows");
  const int64_t rb = row_bytes(w, n);
  if (r1 == r0 || T <= 0) return;
  matmul_fn(w, isa)(n, W + r0 * rb, rb, r1 - r0, act, act_stride, T, Y + r0, ldy);
}

}  // namespace ktune::cpu
