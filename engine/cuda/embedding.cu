// Token embedding lookup on device: out[t] = dequantized row tokens[t] of the embedding table,
// with the token id read from device memory (written by argmax.cu for the next decode step, so
// the whole step can live in one CUDA graph). One thread per output element, the weight type a
// run-time switch (the kernel is a few microseconds of a step; one small .cu instead of five
// instantiations). Out-of-range ids give NaN rows rather than out-of-bounds reads. K-quant tables
// (Q4_K, Q5_K, Q6_K) dequantize 8 elements per thread with rowdot_kquant.cuh's decoder, the
// values of the CPU's dequantize_row bit for bit.
#include "cuda/common.cuh"
#include "cuda/rowdot_kquant.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

__device__ __forceinline__ float load_elem(QuantType type, const uint8_t* row, int64_t i) {
  switch (type) {
    case QuantType::F32:
      return reinterpret_cast<const float*>(row)[i];
    case QuantType::F16:
      return detail::fp16_bits_to_float(reinterpret_cast<const uint16_t*>(row)[i]);
    case QuantType::BF16:
      return detail::bf16_bits_to_float(reinterpret_cast<const uint16_t*>(row)[i]);
    case QuantType::Q8_0: {
      const uint8_t* b = row + (i / 32) * 34;
      const uint16_t d = static_cast<uint16_t>(b[0] | (b[1] << 8));
      return detail::fp16_bits_to_float(d) * static_cast<float>(static_cast<int8_t>(b[2 + i % 32]));
    }
    case QuantType::Q4_0: {
      const uint8_t* b = row + (i / 32) * 18;
      const uint16_t d = static_cast<uint16_t>(b[0] | (b[1] << 8));
      const int j = static_cast<int>(i % 32);
      const uint8_t q = b[2 + (j % 16)];
      const int v = (j < 16 ? (q & 15) : (q >> 4)) - 8;
      return detail::fp16_bits_to_float(d) * static_cast<float>(v);
    }
  }
  return __int_as_float(0x7fc00000);
}

__global__ void embedding_kernel(QuantType type, const uint8_t* __restrict__ table,
                                 int64_t row_bytes, int64_t n_vocab, int64_t n_embd,
                                 const int32_t* __restrict__ tokens, float* __restrict__ out) {
  detail::pdl_wait();  // the token comes from the previous launch (the last step's argmax)
  detail::pdl_trigger();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_embd) return;
  const int64_t t = blockIdx.y;
  const int32_t tok = tokens[t];
  float v = __int_as_float(0x7fc00000);
  if (tok >= 0 && tok < n_vocab) v = load_elem(type, table + tok * row_bytes, i);
  out[t * n_embd + i] = v;
}

template <QuantType T>
__global__ void embedding_kquant_kernel(const uint8_t* __restrict__ table, int64_t row_bytes,
                                        int64_t n_vocab, int64_t n_embd,
                                        const int32_t* __restrict__ tokens,
                                        float* __restrict__ out) {
  detail::pdl_wait();
  detail::pdl_trigger();
  const int64_t slice = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (slice * 8 >= n_embd) return;
  const int64_t t = blockIdx.y;
  const int32_t tok = tokens[t];
  float w[8];
  if (tok >= 0 && tok < n_vocab) {
    using D = detail::RowDot<T>;
    const typename D::Frag f =
        D::load(table + tok * row_bytes, static_cast<int>(slice / 4), static_cast<int>(slice % 4));
    D::values(f, w);
  } else {
    for (float& v : w) v = __int_as_float(0x7fc00000);
  }
  float* o = out + t * n_embd + slice * 8;
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = w[i];
}

}  // namespace

cudaError_t launch_embedding(QuantType type, const void* table, int64_t n_vocab, int64_t n_embd,
                             const int32_t* tokens, int64_t n_tokens, float* out,
                             cudaStream_t stream) {
  int64_t row_bytes = 0;
  switch (type) {
    case QuantType::F32:
      row_bytes = 4 * n_embd;
      break;
    case QuantType::F16:
    case QuantType::BF16:
      row_bytes = 2 * n_embd;
      break;
    case QuantType::Q8_0:
      row_bytes = n_embd / 32 * 34;
      break;
    case QuantType::Q4_0:
      row_bytes = n_embd / 32 * 18;
      break;
    case QuantType::Q4_K:
    case QuantType::Q5_K:
    case QuantType::Q6_K: {
      if (n_vocab <= 0 || n_embd <= 0 || n_embd % 256 != 0 || n_embd > (int64_t{1} << 28) ||
          n_tokens < 0 || n_tokens > 65535 ||
          (reinterpret_cast<uintptr_t>(table) & (type == QuantType::Q6_K ? 1u : 3u)) != 0) {
        return cudaErrorInvalidValue;
      }
      if (n_tokens == 0) return cudaSuccess;
      const int64_t rb = n_embd / 256 *
                         (type == QuantType::Q4_K   ? 144
                          : type == QuantType::Q5_K ? 176
                                                    : 210);
      const dim3 grid(static_cast<unsigned>((n_embd / 8 + 127) / 128),
                      static_cast<unsigned>(n_tokens));
      const auto* tb = static_cast<const uint8_t*>(table);
      switch (type) {
        case QuantType::Q4_K:
          return detail::launch_kernel(&embedding_kquant_kernel<QuantType::Q4_K>, grid, dim3(128),
                                       0, stream, 1, tb, rb, n_vocab, n_embd, tokens, out);
        case QuantType::Q5_K:
          return detail::launch_kernel(&embedding_kquant_kernel<QuantType::Q5_K>, grid, dim3(128),
                                       0, stream, 1, tb, rb, n_vocab, n_embd, tokens, out);
        default:
          return detail::launch_kernel(&embedding_kquant_kernel<QuantType::Q6_K>, grid, dim3(128),
                                       0, stream, 1, tb, rb, n_vocab, n_embd, tokens, out);
      }
    }
    default:
      return cudaErrorInvalidValue;
  }
  if (n_vocab <= 0 || n_embd <= 0 || n_tokens < 0 || n_tokens > 65535 ||
      ((type == QuantType::Q8_0 || type == QuantType::Q4_0) && n_embd % 32 != 0)) {
    return cudaErrorInvalidValue;
  }
  if (n_tokens == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((n_embd + 255) / 256), static_cast<unsigned>(n_tokens));
  return detail::launch_kernel(&embedding_kernel, grid, dim3(256), 0, stream, 1, type,
                               static_cast<const uint8_t*>(table), row_bytes, n_vocab, n_embd,
                               tokens, out);
}

}  // namespace ktune::cuda
