// Kernels of the GPU engine's hybrid and graph-capturable MoE paths (same launcher shape as
// kernels.h: device pointers, workspace from the caller, stream last, cudaErrorInvalidValue
// for arguments they cannot handle; no allocation, no synchronisation):
//
// * Per-slot MoE (moe_slot.cu): the unfused path's per-expert launches in a form a CUDA graph
//   can replay. Each launch works on selected slot j of the token's routing: the expert id is
//   read from device memory (ids[j]), mapped through slot_map (expert id -> compacted GPU slot,
//   -1 = the expert lives on the CPU; nullptr = slot is the id) and the launch does nothing when
//   the slot is -1. Rows are computed exactly as launch_matvec_rowwarp / the fused MoE kernels
//   do (rowwarp_dot.cuh), so per-slot, host-driven unfused and fused MoE agree bit for bit.
//
// * CPU hand-off through flags in mapped pinned memory (cpu_handoff.cu), design §3: for a layer
//   with CPU experts, handoff_signal copies the routing block (normed h, top-k ids, weights)
//   into mapped host memory and then publishes `seq` in the layer's request word; CPU workers
//   (engine/cuda/cpu_expert_driver.h) spin on that word, compute the CPU experts into mapped
//   memory and publish `seq` in the done word; handoff_wait_add spins on the done word, then
//   adds the CPU experts' sum into x. seq = (epoch << 32) | position, both read from device
//   memory, so one captured graph serves every step. The wait gives up after timeout_ns
//   (globaltimer), writes error_code to *error and skips the add; once *error is set every
//   later wait returns at once, so a stalled CPU side costs one timeout, not one per layer.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ktune/engine/pcie_assist.h"
#include "ktune/engine/quant.h"

namespace ktune::cuda {

// y[r] = dot(row r of expert slot_of(ids[j]) in `base`, x), r < rows; expert matrices are
// `matrix_bytes` apart. No-op when the slot is -1. Types and alignment as launch_matvec_rowwarp.
cudaError_t launch_matvec_rowwarp_slot(QuantType type, const void* base, int64_t matrix_bytes,
                                       const int32_t* ids, int64_t j, const int32_t* slot_map,
                                       const float* x, int64_t rows, int64_t cols, float* y,
                                       cudaStream_t stream);
// out[i] = swiglu(g[i], u[i]) for i < n (launch_swiglu's arithmetic); no-op when slot j is -1.
cudaError_t launch_swiglu_slot(const int32_t* ids, int64_t j, const int32_t* slot_map,
                               const float* g, const float* u, int64_t n, float* out,
                               cudaStream_t stream);
// acc[i] = acc[i] + weights[j] * y[i] (rounded multiply, then add: launch_axpy_accumulate's
// arithmetic with the weight read from device memory); no-op when slot j is -1.
cudaError_t launch_axpy_slot(const int32_t* ids, int64_t j, const int32_t* slot_map,
                             const float* weights, const float* y, int64_t n, float* acc,
                             cudaStream_t stream);

// PCIe assist (runtime.pcie_assist, gpu_engine.h): of a token's experts kept on the CPU (slot_map
// -1, or every expert when slot_map is nullptr), the GPU computes the last
// pcie_assist_count(n_cpu, num, den) in top-k order, reading their weights from host memory over
// PCIe. Writes the fused MoE launches' inputs for them: map[e] (n_experts entries) = e for those
// experts, -1 for every other (the slot map over the host tensors); their ids and weights
// compacted into assist_ids / assist_wts[0, k_assist) in top-k order, the rest of the k_assist
// entries padded with an id whose map entry is -1 (weight 0), so that every block of the
// launches works on the assisted experts. k_assist = pcie_assist_count(k, num, den), the most
// any token can have. Ids outside [0, n_experts) are never assisted (the other kernels write NaN).
cudaError_t launch_pcie_assist_map(const int32_t* ids, const float* wts, int64_t k,
                                   int64_t n_experts, const int32_t* slot_map, int num, int den,
                                   int32_t* map, int32_t* assist_ids, float* assist_wts,
                                   int64_t k_assist, cudaStream_t stream);

// One layer's words in mapped memory, shared by the kernels below and the CPU side. 64 bytes so
// that layers do not share a cache line on the host.
struct alignas(64) HandoffWords {
  uint64_t request;  // written by the GPU (or a host node): seq of the step whose routing is in
                     // the stage block
  uint64_t done;     // written by the CPU side: seq whose CPU experts' sum is in the y block
  uint32_t n_cpu;    // CPU experts that contributed (0: nothing to add)
  uint32_t pad[11];
};
static_assert(sizeof(HandoffWords) == 64, "one cache line per layer");

// Copies stage_bytes (a multiple of 4) from stage (device) to stage_mapped (mapped host memory,
// device pointer), makes the copy visible system-wide, then writes seq to words->request.
cudaError_t launch_handoff_signal(const void* stage, size_t stage_bytes, void* stage_mapped,
                                  const int32_t* pos, const uint32_t* epoch, HandoffWords* words,
                                  cudaStream_t stream);
// Waits until words->done == seq (or *error != 0, or timeout_ns elapsed: then *error =
// error_code), then x[i] = x[i] + y_mapped[i] for i < n when words->n_cpu > 0.
cudaError_t launch_handoff_wait_add(const HandoffWords* words, const float* y_mapped,
                                    const int32_t* pos, const uint32_t* epoch, uint32_t* error,
                                    uint32_t error_code, uint64_t timeout_ns, float* x, int64_t n,
                                    cudaStream_t stream);

}  // namespace ktune::cuda
