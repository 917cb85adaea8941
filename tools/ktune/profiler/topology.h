// The topology check that feeds the profiler's verdict (user need 6): CPU worker threads vs
// physical cores (SMT oversubscription), NUMA nodes and where sampled expert memory lives, and
// each GPU's PCIe link (width and speed now vs the maximum) read from sysfs, without NVML.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ktune::profiler {

struct GpuLink {
  std::string device;      // "cuda:0"
  std::string pci_bus_id;  // "0000:1b:00.0" ("" when unknown)
  int cur_gen = 0, max_gen = 0;  // 0 = unknown
  int cur_width = 0, max_width = 0;
  int numa_node = -1;  // the GPU's NUMA node (-1 unknown)
};

struct Topology {
  int physical_cores = 0;
  int logical_cpus = 0;
  int numa_nodes = 1;
  int threads_used = 0;  // CPU worker threads of the profiled engine (0: none)
  // Pages of the sampled expert memory found on each NUMA node (empty: not sampled/unknown).
  std::vector<int64_t> expert_pages_per_node;
  std::vector<GpuLink> gpus;
  std::vector<std::string> warnings;  // plain-language findings, most important first
};

// PCIe generation of a sysfs link speed ("16.0 GT/s PCIe" -> 4); 0 when unknown.
int pcie_gen_from_speed(const std::string& sysfs_speed);

// Reads the machine. `expert_sample` (optional): addresses inside expert weights to locate on
// NUMA nodes (a few hundred pages are plenty). The GPU list comes from the CUDA runtime's PCI
// bus ids when the build and machine have GPUs.
Topology read_topology(int threads_used, const std::vector<const void*>& expert_sample);

// The warnings for a topology (pure; read_topology calls it): threads > physical cores, expert
// pages on several nodes of a multi-node machine, a GPU link below its maximum.
std::vector<std::string> topology_warnings(const Topology& t);

nlohmann::json to_json(const Topology& t);

}  // namespace ktune::profiler
