// CpuMoe split over NUMA nodes (issue 7 item 2; docs/placement.md "NUMA nodes").
//
// A placement that puts experts on cpu:0, cpu:1, ... gets one worker group per named node: a
// ThreadPool whose workers are pinned to that node's cores and a CpuMoe over it. compute() takes
// the same arguments as CpuMoe::compute (a subset of one token's selected experts and their
// weights), splits them by node keeping their order, runs every node's CpuMoe at the same time
// (node k's pool is driven by its own driver thread pinned to the node's first core; the caller
// drives the lowest node), and sums the nodes' partial results in ascending node order:
//
//   y = y_a + y_b + ...   (a < b < ...: the nodes with at least one of the given experts;
//                          y_k = CpuMoe's sum over node k's experts in the given order)
//
// so y is deterministic for any thread counts and schedules. It equals the one-pool CpuMoe over
// the same experts exactly when the given experts sit on one node, and up to float summation
// order otherwise (the one pool sums s += w_j*y_j over all j; here each node sums its own, then
// the nodes are added). Bit-identity with the one pool would need every expert's output apart
// (one CpuMoe call per expert, a parallel region each): not worth it for a difference of a few
// ulps that the top-k routing already tolerates.
//
// Placements that name no node, and every placement on a machine with one node, use one pool
// over all of the host (n_threads, pinned as ThreadPool does) and one CpuMoe: cpu:0 on a
// one-node machine is exactly cpu. A placement that names nodes may not also put experts on
// plain cpu (there is no one pool of "all" next to the node groups): that is an error.
//
// Wiring into the hybrid GPU engine (not done here; engine/cuda is another owner's):
// GpuEngineOptions must carry each CPU expert's device (a resolved Placement, or a Placement
// built in code whose layers[l].experts are the devices: only those are read); gpu_engine.cpp
// replaces `pool = ThreadPool(opt.cpu_threads, opt.pin_threads); cpu_moe = CpuMoe(w, *pool)` by
// `NumaCpuMoe(w, placement, host_numa_topology(), {opt.cpu_threads, opt.pin_threads})`; the
// CpuExpertDriver and the host-driven path call its compute() (CpuMoe's signature); the driver
// thread is pinned to caller_cpu() when it is >= 0 (else the current free-core rule over
// group_pool(0).pinned_cpus()); reports print threads() and bind_report().note; then the
// refusal of node placements in ktune run's choose_engine goes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/model.h"
#include "ktune/engine/numa.h"
#include "ktune/engine/placement.h"

namespace ktune {

class CpuMoe;
class ThreadPool;

struct NumaCpuMoeOptions {
  // Threads per node group (<= 0: one per physical core of the node). For the one-pool case:
  // the pool's threads (<= 0: one per physical core of the host).
  int threads = 0;
  bool pin = true;
  cpu::Isa isa = cpu::detect_isa();
  // Bind the weights of the experts on cpu:N to node N at construction (bind_experts_to_nodes;
  // best-effort, see numa.h). `mbind` substitutes the system call (tests).
  bool bind_memory = true;
  MbindFn mbind;
};

class NumaCpuMoe {
 public:
  // weights must outlive this object; the placement must be resolved for this model. Throws
  // ktune::Error for a node `topo` lacks, for experts on plain cpu next to cpu:N ones, and for
  // what CpuMoe's constructor refuses.
  NumaCpuMoe(const ModelWeights& weights, const Placement& placement, const NumaTopology& topo,
             const NumaCpuMoeOptions& opt = {});
  ~NumaCpuMoe();
  NumaCpuMoe(const NumaCpuMoe&) = delete;
  NumaCpuMoe& operator=(const NumaCpuMoe&) = delete;

  // As CpuMoe::compute. Every expert given must be on a CPU device of the placement for `layer`
  // (throws ktune::Error before any work otherwise). Nothing is allocated.
  void compute(int64_t layer, const float* h, const int32_t* experts, const float* weights, int n,
               float* y);

  int max_experts() const;
  // Worker groups: 1 (the one-pool case) or one per node the placement names, ascending.
  int groups() const;
  int group_node(int g) const;  // -1: the one-pool case (the whole host)
  ThreadPool& group_pool(int g);
  CpuMoe& group_moe(int g);
  // Total worker threads over the groups (drivers included).
  int threads() const;
  // A CPU for the thread that calls compute() (the lowest node's first core; -1: no preference,
  // the one-pool case keeps ThreadPool's rule: the caller takes the core no worker is pinned to).
  int caller_cpu() const;
  const NumaBindReport& bind_report() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ktune
