// Topology facts from sysfs and the CUDA runtime (profiler/topology.h).
#include "profiler/topology.h"

#include <dirent.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ktune/engine/thread_pool.h"

#if KTUNE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ktune::profiler {
namespace {

[[maybe_unused]] std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  return s;
}

int count_numa_nodes() {
  DIR* d = opendir("/sys/devices/system/node");
  if (d == nullptr) return 1;
  int n = 0;
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind("node", 0) == 0 && name.size() > 4 &&
        std::isdigit(static_cast<unsigned char>(name[4]))) {
      ++n;
    }
  }
  closedir(d);
  return std::max(n, 1);
}

}  // namespace

int pcie_gen_from_speed(const std::string& s) {
  const double gt = std::atof(s.c_str());
  if (gt <= 0) return 0;
  if (gt < 3) return 1;
  if (gt < 6) return 2;
  if (gt < 10) return 3;
  if (gt < 20) return 4;
  if (gt < 40) return 5;
  if (gt < 80) return 6;
  return 7;
}

std::vector<std::string> topology_warnings(const Topology& t) {
  std::vector<std::string> w;
  if (t.threads_used > 0 && t.physical_cores > 0 && t.threads_used > t.physical_cores) {
    w.push_back("CPU threads (" + std::to_string(t.threads_used) + ") exceed the " +
                std::to_string(t.physical_cores) +
                " physical cores: SMT oversubscription slows memory-bound expert work; use "
                "--threads " +
                std::to_string(t.physical_cores) + " or fewer");
  }
  if (t.numa_nodes > 1) {
    int used = 0;
    for (int64_t p : t.expert_pages_per_node) used += p > 0 ? 1 : 0;
    if (used > 1) {
      w.push_back("expert memory is spread over " + std::to_string(used) + " of " +
                  std::to_string(t.numa_nodes) +
                  " NUMA nodes: CPU experts read remote memory; bind the run to one node "
                  "(numactl --cpunodebind=0 --membind=0) or place threads by node");
    } else {
      w.push_back("this machine has " + std::to_string(t.numa_nodes) +
                  " NUMA nodes: CPU expert bandwidth depends on where threads and memory sit");
    }
  }
  for (const GpuLink& g : t.gpus) {
    const bool slow_width = g.cur_width > 0 && g.max_width > 0 && g.cur_width < g.max_width;
    const bool slow_gen = g.cur_gen > 0 && g.max_gen > 0 && g.cur_gen < g.max_gen;
    if (slow_width || slow_gen) {
      w.push_back(g.device + " PCIe link runs at gen" + std::to_string(g.cur_gen) + " x" +
                  std::to_string(g.cur_width) + " (max gen" + std::to_string(g.max_gen) + " x" +
                  std::to_string(g.max_width) +
                  "); idle links downshift, so this matters only if it stays low under load");
    }
  }
  return w;
}

Topology read_topology(int threads_used, const std::vector<const void*>& expert_sample) {
  Topology t;
  t.physical_cores = physical_core_count();
  t.logical_cpus = static_cast<int>(std::max<long>(sysconf(_SC_NPROCESSORS_ONLN), 1));
  t.numa_nodes = count_numa_nodes();
  t.threads_used = threads_used;
  if (!expert_sample.empty()) {
    // move_pages with no target nodes reports the node of each page (or -errno).
    const long page = sysconf(_SC_PAGESIZE);
    std::vector<void*> pages;
    for (const void* p : expert_sample) {
      pages.push_back(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) &
                                              ~static_cast<uintptr_t>(page - 1)));
    }
    std::vector<int> status(pages.size(), -1);
    if (syscall(SYS_move_pages, 0, static_cast<unsigned long>(pages.size()), pages.data(),
                nullptr, status.data(), 0) == 0) {
      t.expert_pages_per_node.assign(static_cast<size_t>(t.numa_nodes), 0);
      for (int s : status) {
        if (s >= 0 && s < t.numa_nodes) ++t.expert_pages_per_node[static_cast<size_t>(s)];
      }
    }
  }
#if KTUNE_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) == cudaSuccess) {
    for (int d = 0; d < n; ++d) {
      GpuLink g;
      g.device = "cuda:" + std::to_string(d);
      char bus[32] = {};
      if (cudaDeviceGetPCIBusId(bus, sizeof bus, d) == cudaSuccess) {
        std::string id = bus;
        for (char& c : id) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        // The runtime may print an 8-digit domain; sysfs uses 4.
        if (id.size() > 12 && id.find(':') == 8) id = id.substr(4);
        g.pci_bus_id = id;
        const std::string dir = "/sys/bus/pci/devices/" + id + "/";
        g.cur_gen = pcie_gen_from_speed(read_line(dir + "current_link_speed"));
        g.max_gen = pcie_gen_from_speed(read_line(dir + "max_link_speed"));
        g.cur_width = std::atoi(read_line(dir + "current_link_width").c_str());
        g.max_width = std::atoi(read_line(dir + "max_link_width").c_str());
        const std::string node = read_line(dir + "numa_node");
        g.numa_node = node.empty() ? -1 : std::atoi(node.c_str());
      }
      t.gpus.push_back(g);
    }
  } else {
    cudaGetLastError();
  }
#endif
  t.warnings = topology_warnings(t);
  return t;
}

nlohmann::json to_json(const Topology& t) {
  nlohmann::json g = nlohmann::json::array();
  for (const GpuLink& l : t.gpus) {
    g.push_back({{"device", l.device},
                 {"pci_bus_id", l.pci_bus_id},
                 {"pcie_gen", l.cur_gen},
                 {"pcie_width", l.cur_width},
                 {"pcie_max_gen", l.max_gen},
                 {"pcie_max_width", l.max_width},
                 {"numa_node", l.numa_node}});
  }
  return {{"physical_cores", t.physical_cores},
          {"logical_cpus", t.logical_cpus},
          {"numa_nodes", t.numa_nodes},
          {"threads_used", t.threads_used},
          {"expert_pages_per_node", t.expert_pages_per_node},
          {"gpus", g},
          {"warnings", t.warnings}};
}

}  // namespace ktune::profiler
