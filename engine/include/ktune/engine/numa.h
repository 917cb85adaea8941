// NUMA topology and node-local memory for CPU experts (issue 7 item 2, docs/placement.md
// "NUMA nodes").
//
// A placement may put experts on `cpu:N`: their weights live in node N's memory and node N's
// worker group computes them. Plain `cpu` means the whole host (every node's CPUs, memory where
// the kernel puts it). This file reads the topology from sysfs under a root path (tests point it
// at a faked tree), checks that a placement's nodes exist, and binds expert weight ranges to
// their node with the raw mbind syscall (no libnuma). Binding is best-effort: containers often
// forbid it (EPERM) or the kernel lacks it (ENOSYS); a failure leaves the pages where they are,
// is counted, and is reported once, never an error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"

namespace ktune {

struct NumaNode {
  int id = 0;
  // The node's CPUs this process may run on: the first CPU of each physical core (ordered by
  // CPU number), then the remaining SMT siblings (ordered by CPU number). A worker group of
  // `physical_cores` threads takes the first ones: one thread per core, like ThreadPool's default.
  std::vector<int> cpus;
  int physical_cores = 0;
  int64_t mem_total_bytes = -1;  // nodeN/meminfo MemTotal (-1: unknown)
  int64_t mem_free_bytes = -1;   // nodeN/meminfo MemFree (-1: unknown)
};

struct NumaTopology {
  // Nodes with at least one CPU this process may use, by id. Memory-only nodes and nodes
  // outside the process's CPU mask are left out: they cannot run a worker group.
  std::vector<NumaNode> nodes;
  bool from_sysfs = false;  // false: no node directory, the whole host as one node 0

  const NumaNode* find(int id) const;
  int size() const { return static_cast<int>(nodes.size()); }
  // "cpu:0, cpu:1"
  std::string device_names() const;
};

// Reads `sys_root`/node/node*/{cpulist,meminfo} and `sys_root`/cpu/cpu*/topology/{core_id,
// physical_package_id}. `allowed` lists the CPUs the process may use (null: its affinity mask).
// Without `sys_root`/node (or with no node directory listing an allowed CPU) the result is one
// node 0 holding every allowed CPU. A CPU without readable topology counts as its own core.
NumaTopology read_numa_topology(const std::string& sys_root = "/sys/devices/system",
                                const std::vector<int>* allowed = nullptr);
// This machine's topology, read once (node 0 of the one-node fallback gets the host's MemTotal).
const NumaTopology& host_numa_topology();

// "0-3,8,10-11" -> {0,1,2,3,8,10,11} (sysfs cpulist syntax; empty text: empty list). Throws
// ktune::Error naming `where` on malformed text.
std::vector<int> parse_cpu_list(const std::string& text, const std::string& where);

// The NUMA nodes (indices of cpu:N) a resolved placement names, sorted; empty for placements that
// use plain `cpu` only.
std::vector<int> placement_numa_nodes(const Placement& p);

// Throws ktune::Error (runtime) naming the first cpu:N of the placement that `topo` lacks:
// "cpu:1: no such NUMA node here (this machine has cpu:0); ...".
void check_numa_nodes_present(const Placement& p, const NumaTopology& topo);

// ------------------------------------------------------------------------ node-local memory --

// The mbind system call's signature; tests substitute a fake.
using MbindFn = std::function<long(void* addr, unsigned long len, int mode,
                                   const unsigned long* nodemask, unsigned long maxnode,
                                   unsigned flags)>;
// The raw syscall (returns -1 with errno ENOSYS where there is none).
long mbind_syscall(void* addr, unsigned long len, int mode, const unsigned long* nodemask,
                   unsigned long maxnode, unsigned flags);

struct NumaBindReport {
  int64_t ranges = 0;         // mbind calls made
  int64_t bytes_bound = 0;    // bytes moved to (or already on) their node
  int64_t bytes_failed = 0;   // bytes of calls that failed (left where they were)
  int64_t bytes_edge = 0;     // bytes in pages shared with a neighbour on another node: not moved
  int64_t failures = 0;       // failed calls
  int first_errno = 0;        // errno of the first failure
  std::string note;           // "" or one line saying why binding did not happen (reported once)
};

// Binds the weights of every expert the placement puts on cpu:N to node N (MPOL_BIND with
// MPOL_MF_MOVE, so pages already touched move): for each layer, each run of consecutive experts
// on one node becomes one range per tensor (gate, up, down), shrunk to whole pages (a page shared
// with an expert on another node stays where it is: bytes_edge). Does nothing for placements
// that name no node, or when `topo` has one node (cpu:0 then is the whole host, exactly like
// cpu). Failures are counted; the first one's reason goes to `note` and, when `warn` is set, to
// stderr once per process ("ktune: warning: ..."). Never throws for a failed bind.
NumaBindReport bind_experts_to_nodes(const ModelWeights& w, const Placement& p,
                                     const NumaTopology& topo, const MbindFn& mbind = nullptr,
                                     bool warn = true);

}  // namespace ktune
