// `ktune profile --hardware`: the machine's costs without a model (design §5): CPU DRAM read
// bandwidth and CpuMoe expert bandwidth by thread count; per GPU: device-memory read bandwidth,
// pinned H2D/D2H copies, an eager launch, a graph node, a host node, a mapped-memory flag round
// trip to a CPU thread, a stream sync, the effective bandwidth of ktune's matvec and MoE kernels
// (fused and unfused), their GPU time by weight bytes at several model shapes, the GPU-side gap
// of eager launches, the engine's CPU hand-off per layer and the attention kernel's time. Fills
// the profile summary.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "profiler/profile_summary.h"

namespace ktune::profiler {

struct HardwareOptions {
  std::vector<int> threads;  // CPU thread counts to measure (default: 1, cores/4, cores/2, cores)
  bool quick = false;        // small buffers and one repetition (tests, CI)
};

// The CPU part of the summary: name, cores, NUMA nodes, ISA, memory, read bandwidth curve.
profile::CpuInfo measure_cpu(const HardwareOptions& o, nlohmann::json* raw);
// CpuMoe effective bandwidth (weight bytes ÷ compute() time) on synthetic experts of
// qwen3-30b-a3b's shape (Q4_0, top-8 of 128; 6 layers cycled, a working set far above the
// last-level cache), by thread count; call_us (optional) receives the fixed cost of one call at
// the largest thread count (profile_summary.h, CpuCosts::moe_call_us).
// With `assist` and a GPU: the PCIe assist's rates (CpuCosts::pcie_assist_gb_s, moe_pcie_ratio):
// CpuMoe at the hybrid engine's thread count alone and while cuda:0 reads pinned host memory.
std::vector<profile::ThreadRate> measure_cpu_moe(const HardwareOptions& o, nlohmann::json* raw,
                                                 double* call_us = nullptr,
                                                 profile::CpuCosts* assist = nullptr);
// Every GPU of this machine (none without CUDA or a device): fills gpus and gpu_costs.
void measure_gpus(const HardwareOptions& o, profile::ProfileSummary& s, nlohmann::json* raw);

// With more than one GPU in s.gpus: every directed pair's peer-copy bandwidth and latency and,
// when libnccl.so.2 loads, NCCL send/recv's (profiler/interconnect.cpp); fills s.interconnect.
// Nothing with one GPU or without CUDA.
void measure_interconnect(const HardwareOptions& o, profile::ProfileSummary& s,
                          nlohmann::json* raw);

// Version, commit, creation time (ISO 8601 UTC) of a new summary.
void stamp_summary(profile::ProfileSummary& s, const std::string& kind);

}  // namespace ktune::profiler
