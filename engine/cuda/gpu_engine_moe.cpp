// The MoE of one layer in the decode step (GpuEngine::Impl, engine/cuda/gpu_engine_impl.h):
// the fused and unfused GPU paths and the CPU experts of a hybrid placement.
#include <cstdlib>
#include <string>

#include "cuda/gpu_engine_impl.h"
#include "ktune/engine/cuda/hybrid_kernels.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/trace.h"

namespace ktune {

using gpu_detail::check_launch;

void GpuEngine::Impl::moe(const DevLayer& d, int64_t l) {
  cudaStream_t s = stream;
  if (opt.moe_kernel == MoeKernel::Unfused) {
    if (opt.cuda_graph) {
      moe_unfused_slots(d, l);
    } else {
      moe_unfused(d, l);
    }
    return;
  }
  // CPU experts: routing handed over first, so the CPU computes while the GPU experts run.
  if (d.n_cpu_experts > 0) begin_handoff(l);
  if (d.n_gpu_experts > 0) {
    check_launch(
        cuda::launch_moe_gate_up_swiglu(d.gate.type, d.gate.data, d.up.data, d.gate.matrix_bytes,
                                        ids, top_k, n_exp, h, ffn, hidden, act, s, d.slot_map),
        "launch_moe_gate_up_swiglu");
    check_launch(cuda::launch_moe_down_sum(d.down.type, d.down.data, d.down.matrix_bytes, ids, wts,
                                           top_k, n_exp, act, hidden, ffn, x, s, d.slot_map),
                 "launch_moe_down_sum");
  }
  if (d.n_cpu_experts > 0 && pcie_num > 0 && d.host_gate != nullptr) {
    // PCIe assist: the same fused launches over the host tensors, for the CPU experts the map
    // hands to the GPU (the driver skips the same ones), while the CPU computes the rest.
    trace::Scope gpu_experts(trace::Phase::MoeGpu, static_cast<int32_t>(l));
    // The assisted experts compacted into pcie_k slots, so every block of the two launches
    // reads host memory (PCIe needs many bytes in flight) instead of 3 blocks in 8.
    check_launch(cuda::launch_pcie_assist_map(ids, wts, top_k, n_exp, d.slot_map, pcie_num,
                                              pcie_den, pcie_map, pcie_ids, pcie_wts, pcie_k, s),
                 "launch_pcie_assist_map");
    check_launch(cuda::launch_moe_gate_up_swiglu(d.gate.type, d.host_gate, d.host_up,
                                                 d.host_gate_bytes, pcie_ids, pcie_k, n_exp, h,
                                                 ffn, hidden, act, s, pcie_map),
                 "launch_moe_gate_up_swiglu (pcie assist)");
    check_launch(cuda::launch_moe_down_sum(d.down.type, d.host_down, d.host_down_bytes, pcie_ids,
                                           pcie_wts, pcie_k, n_exp, act, hidden, ffn, x, s,
                                           pcie_map),
                 "launch_moe_down_sum (pcie assist)");
  }
  if (d.n_cpu_experts > 0) end_handoff(l);
}

void GpuEngine::Impl::setup_pcie_assist(const ModelWeights& w) {
  int num = opt.pcie_assist_permille;
  if (const char* e = std::getenv("KTUNE_PCIE_ASSIST")) {  // experiments and a kill switch
    num = parse_pcie_assist(e, "KTUNE_PCIE_ASSIST");
  }
  if (num <= 0) return;
  if (num > kMaxPcieAssistPermille) {
    throw Error("pcie assist", pcie_assist_text(num) + " is above 0.95",
                "give a share from 0 to 0.95", ErrorKind::Usage);
  }
  auto off = [&](const std::string& why) { pcie_note = "pcie assist off: " + why; };
  if (!is_hybrid) return off("every expert is on the GPU");
  if (spec.shared_cpu_side) return off("not with a layer split over several GPUs yet");
  if (!driver || opt.moe_kernel != MoeKernel::Fused) return off("it needs the fused MoE kernel");
  const int den = 1000;
  pcie_k = pcie_assist_count(static_cast<int>(top_k), num, den);
  if (pcie_k == 0) {
    return off("a share this small hands the GPU no expert at top-" + std::to_string(top_k));
  }
  // Every CPU-expert layer's host tensors must be usable on the device as they are (registered
  // by prefill_setup; the device reads registered memory through the host pointer).
  for (int64_t l = lb; l < le; ++l) {
    DevLayer& d = L[static_cast<size_t>(l)];
    if (d.n_cpu_experts == 0) continue;
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    for (const TensorView* t : {&lw.gate_exps, &lw.up_exps, &lw.down_exps}) {
      cudaPointerAttributes a{};
      const cudaError_t err = cudaPointerGetAttributes(&a, t->data);
      if (err != cudaSuccess || a.type != cudaMemoryTypeHost || a.devicePointer != t->data) {
        cudaGetLastError();
        return off(t->name + " is not registered host memory the GPU can read directly");
      }
    }
    d.host_gate = lw.gate_exps.data;
    d.host_up = lw.up_exps.data;
    d.host_down = lw.down_exps.data;
    d.host_gate_bytes = lw.gate_exps.nbytes() / n_exp;
    d.host_up_bytes = lw.up_exps.nbytes() / n_exp;
    d.host_down_bytes = lw.down_exps.nbytes() / n_exp;
  }
  pcie_num = num;
  pcie_den = den;
  driver->set_pcie_assist(num, den);
}

// The unfused path inside a CUDA graph: the same five launches per selected slot as the
// host-driven path, but each reads its expert from device memory (a CPU expert's slot is a no-op),
// so nothing is read on the host mid-step. acc and the add keep the host path's sum order.
void GpuEngine::Impl::moe_unfused_slots(const DevLayer& d, int64_t l) {
  cudaStream_t s = stream;
  if (d.n_cpu_experts > 0) begin_handoff(l);
  if (d.n_gpu_experts > 0) {
    trace::Scope gpu_experts(trace::Phase::MoeGpu, static_cast<int32_t>(l));
    KTUNE_CUDA_CHECK(cudaMemsetAsync(acc, 0, static_cast<size_t>(hidden) * sizeof(float), s));
    for (int64_t j = 0; j < top_k; ++j) {
      float* a = act + j * ffn;
      check_launch(cuda::launch_matvec_rowwarp_slot(d.gate.type, d.gate.data, d.gate.matrix_bytes,
                                                    ids, j, d.slot_map, h, ffn, hidden, g, s),
                   "gate slot");
      check_launch(cuda::launch_matvec_rowwarp_slot(d.up.type, d.up.data, d.up.matrix_bytes, ids, j,
                                                    d.slot_map, h, ffn, hidden, u, s),
                   "up slot");
      check_launch(cuda::launch_swiglu_slot(ids, j, d.slot_map, g, u, ffn, a, s), "swiglu slot");
      check_launch(cuda::launch_matvec_rowwarp_slot(d.down.type, d.down.data, d.down.matrix_bytes,
                                                    ids, j, d.slot_map, a, hidden, ffn, ye, s),
                   "down slot");
      check_launch(cuda::launch_axpy_slot(ids, j, d.slot_map, wts, ye, hidden, acc, s),
                   "axpy slot");
    }
    check_launch(cuda::launch_add_inplace(x, acc, hidden, s), "launch_add_inplace moe");
  }
  if (d.n_cpu_experts > 0) end_handoff(l);
}

// The CPU experts of the routing in h_stage (copied and complete): CpuMoe over the selected
// experts kept on the CPU, in slot order, into pinned memory; then the copy to the device and
// x += y_cpu enqueued on the stream, after whatever GPU experts were enqueued before.
void GpuEngine::Impl::cpu_experts(const DevLayer& d, int64_t l) {
  int n = 0;
  for (int64_t j = 0; j < top_k; ++j) {
    const int32_t id = h_ids[j];
    if (id < 0 || id >= n_exp) {
      throw Error("gpu engine",
                  "router chose expert " + std::to_string(id) + " of " + std::to_string(n_exp),
                  "the model's router produced NaN logits");
    }
    if (d.host_slot[static_cast<size_t>(id)] >= 0) continue;  // a GPU expert
    sel_ids[static_cast<size_t>(n)] = id;
    sel_w[static_cast<size_t>(n)] = h_wts[j];
    ++n;
  }
  if (n == 0) return;
  {
    trace::Scope cpu_experts(trace::Phase::MoeCpu, static_cast<int32_t>(l));
    cpu_side_moe().compute(l, h_h, sel_ids.data(), sel_w.data(), n, h_ycpu);
  }
  cudaStream_t s = stream;
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(ycpu, h_ycpu, static_cast<size_t>(hidden) * sizeof(float),
                                   cudaMemcpyHostToDevice, s));
  check_launch(cuda::launch_add_inplace(x, ycpu, hidden, s), "launch_add_inplace cpu experts");
}

// The per-expert pattern: routing to the host (sync), then 5 launches per selected expert.
// With CPU experts in the layer: the whole routing block (h too) comes over, the GPU experts
// are launched first, then the CPU experts run while the GPU works (same sums as fused).
void GpuEngine::Impl::moe_unfused(const DevLayer& d, int64_t l) {
  cudaStream_t s = stream;
  {  // routing to the host and the stream synchronised: this path's per-layer sync
    trace::Scope transfer(trace::Phase::Transfer, static_cast<int32_t>(l));
    if (d.n_cpu_experts > 0) {
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(h_stage, stage, stage_bytes, cudaMemcpyDeviceToHost, s));
    } else {
      KTUNE_CUDA_CHECK(
          cudaMemcpyAsync(h_ids, ids, stage_bytes - stage_ids_off, cudaMemcpyDeviceToHost, s));
    }
    KTUNE_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  trace::Scope gpu_experts(trace::Phase::MoeGpu, static_cast<int32_t>(l));
  if (d.n_gpu_experts > 0) {
    KTUNE_CUDA_CHECK(cudaMemsetAsync(acc, 0, static_cast<size_t>(hidden) * sizeof(float), s));
  }
  for (int64_t j = 0; j < top_k && d.n_gpu_experts > 0; ++j) {
    const int32_t id = h_ids[j];
    if (id < 0 || id >= n_exp) {
      throw Error("gpu engine",
                  "router chose expert " + std::to_string(id) + " of " + std::to_string(n_exp),
                  "the model's router produced NaN logits");
    }
    const int64_t slot = d.host_slot.empty() ? id : d.host_slot[static_cast<size_t>(id)];
    if (slot < 0) continue;  // a CPU expert
    const auto* gb = static_cast<const uint8_t*>(d.gate.data) + slot * d.gate.matrix_bytes;
    const auto* ub = static_cast<const uint8_t*>(d.up.data) + slot * d.up.matrix_bytes;
    const auto* db = static_cast<const uint8_t*>(d.down.data) + slot * d.down.matrix_bytes;
    check_launch(cuda::launch_matvec_rowwarp(d.gate.type, gb, h, ffn, hidden, g, s), "gate");
    check_launch(cuda::launch_matvec_rowwarp(d.up.type, ub, h, ffn, hidden, u, s), "up");
    float* a = act + j * ffn;
    check_launch(cuda::launch_swiglu(g, u, ffn, a, s), "launch_swiglu");
    check_launch(cuda::launch_matvec_rowwarp(d.down.type, db, a, hidden, ffn, ye, s), "down");
    check_launch(cuda::launch_axpy_accumulate(h_wts[j], ye, hidden, acc, s), "axpy");
  }
  if (d.n_gpu_experts > 0) {
    check_launch(cuda::launch_add_inplace(x, acc, hidden, s), "launch_add_inplace moe");
  }
  if (d.n_cpu_experts > 0) cpu_experts(d, l);
}

}  // namespace ktune
