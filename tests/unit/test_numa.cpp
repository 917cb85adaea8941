// NUMA (issue 7 item 2) with faked topologies: discovery from a fake sysfs tree, node checks,
// per-node memory pools and budgets, binding expert weights (mbind faked: success, EPERM,
// ENOSYS), and the per-node CpuMoe split against the one-pool CpuMoe.
#include <gtest/gtest.h>

#include <map>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/trace.h"
#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/cpu_moe_numa.h"
#include "ktune/engine/error.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/model.h"
#include "ktune/engine/numa.h"
#include "ktune/engine/placement.h"
#include "ktune/engine/thread_pool.h"
#include "run_bench.h"

namespace ktune {
namespace {

namespace fs = std::filesystem;

#define EXPECT_HAS(text, part)                               \
  EXPECT_NE(std::string(text).find(part), std::string::npos) \
      << "expected to find [" << (part) << "] in [" << (text) << "]"

// A temporary fake /sys/devices/system.
class FakeSys {
 public:
  FakeSys() {
    root_ = fs::temp_directory_path() /
            ("ktune-numa-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++));
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  ~FakeSys() { fs::remove_all(root_); }
  std::string root() const { return root_.string(); }
  void write(const std::string& rel, const std::string& text) {
    const fs::path p = root_ / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  void node(int id, const std::string& cpulist, int64_t total_kb = -1, int64_t free_kb = -1) {
    const std::string d = "node/node" + std::to_string(id) + "/";
    write(d + "cpulist", cpulist + "\n");
    if (total_kb >= 0) {
      write(d + "meminfo", "Node " + std::to_string(id) + " MemTotal:  " +
                               std::to_string(total_kb) + " kB\nNode " + std::to_string(id) +
                               " MemFree:   " + std::to_string(free_kb) + " kB\n");
    }
  }
  void cpu(int cpu, int package, int core) {
    const std::string d = "cpu/cpu" + std::to_string(cpu) + "/topology/";
    write(d + "physical_package_id", std::to_string(package) + "\n");
    write(d + "core_id", std::to_string(core) + "\n");
  }

 private:
  static inline int counter_ = 0;
  fs::path root_;
};

// Two sockets, two cores each, two SMT threads per core (Linux numbering: siblings last).
void two_socket_box(FakeSys& s) {
  s.node(0, "0-1,4-5", 1024 * 1024, 512 * 1024);  // 1 GiB
  s.node(1, "2-3,6-7", 3 * 1024 * 1024, 1024);    // 3 GiB
  s.write("node/possible", "0-1\n");              // not a node directory
  for (int c = 0; c < 8; ++c) s.cpu(c, c % 4 < 2 ? 0 : 1, c % 2);
}

TEST(NumaTopology, ReadsNodesCoresAndMemoryFromAFakeTree) {
  FakeSys s;
  two_socket_box(s);
  const std::vector<int> all = {0, 1, 2, 3, 4, 5, 6, 7};
  const NumaTopology t = read_numa_topology(s.root(), &all);
  EXPECT_TRUE(t.from_sysfs);
  ASSERT_EQ(t.size(), 2);
  EXPECT_EQ(t.nodes[0].id, 0);
  EXPECT_EQ(t.nodes[0].cpus, (std::vector<int>{0, 1, 4, 5}));  // cores' first CPUs, siblings
  EXPECT_EQ(t.nodes[0].physical_cores, 2);
  EXPECT_EQ(t.nodes[0].mem_total_bytes, int64_t(1) << 30);
  EXPECT_EQ(t.nodes[0].mem_free_bytes, int64_t(512) << 20);
  EXPECT_EQ(t.nodes[1].id, 1);
  EXPECT_EQ(t.nodes[1].cpus, (std::vector<int>{2, 3, 6, 7}));
  EXPECT_EQ(t.nodes[1].physical_cores, 2);
  EXPECT_EQ(t.nodes[1].mem_total_bytes, int64_t(3) << 30);
  EXPECT_EQ(t.device_names(), "cpu:0, cpu:1");
  EXPECT_NE(t.find(1), nullptr);
  EXPECT_EQ(t.find(2), nullptr);
}

TEST(NumaTopology, IntersectsWithTheAllowedCpus) {
  FakeSys s;
  two_socket_box(s);
  const std::vector<int> some = {1, 5, 6};  // a cpuset spanning both nodes
  NumaTopology t = read_numa_topology(s.root(), &some);
  ASSERT_EQ(t.size(), 2);
  EXPECT_EQ(t.nodes[0].cpus, (std::vector<int>{1, 5}));  // 5 is 1's sibling: one core
  EXPECT_EQ(t.nodes[0].physical_cores, 1);
  EXPECT_EQ(t.nodes[1].cpus, (std::vector<int>{6}));
  const std::vector<int> node0 = {0, 4};  // taskset to node 0: node 1 is not usable
  t = read_numa_topology(s.root(), &node0);
  ASSERT_EQ(t.size(), 1);
  EXPECT_EQ(t.nodes[0].id, 0);
  EXPECT_EQ(t.nodes[0].physical_cores, 1);
}

TEST(NumaTopology, MemoryOnlyNodesAreLeftOut) {
  FakeSys s;
  two_socket_box(s);
  s.node(2, "", 64 * 1024 * 1024, 0);  // CXL / HBM: memory, no CPU
  const std::vector<int> all = {0, 1, 2, 3, 4, 5, 6, 7};
  const NumaTopology t = read_numa_topology(s.root(), &all);
  EXPECT_EQ(t.size(), 2);
  EXPECT_EQ(t.find(2), nullptr);
}

TEST(NumaTopology, NoNodeDirectoryIsOneNode) {
  FakeSys s;
  s.cpu(0, 0, 0);
  s.cpu(1, 0, 0);  // SMT sibling
  s.cpu(2, 0, 1);
  const std::vector<int> all = {0, 1, 2};
  const NumaTopology t = read_numa_topology(s.root(), &all);
  EXPECT_FALSE(t.from_sysfs);
  ASSERT_EQ(t.size(), 1);
  EXPECT_EQ(t.nodes[0].id, 0);
  EXPECT_EQ(t.nodes[0].cpus, (std::vector<int>{0, 2, 1}));
  EXPECT_EQ(t.nodes[0].physical_cores, 2);
  EXPECT_EQ(t.nodes[0].mem_total_bytes, -1);
  // A CPU without topology files is its own core.
  const NumaTopology bare = read_numa_topology(s.root() + "/missing", &all);
  EXPECT_EQ(bare.nodes[0].physical_cores, 3);
}

TEST(NumaTopology, HostTopologyHasEveryAllowedCpu) {
  const NumaTopology& t = host_numa_topology();
  ASSERT_GE(t.size(), 1);
  int cpus = 0;
  for (const NumaNode& n : t.nodes) {
    EXPECT_GE(n.physical_cores, 1);
    cpus += int(n.cpus.size());
  }
  EXPECT_GE(cpus, physical_core_count());
}

TEST(NumaTopology, CpuLists) {
  EXPECT_EQ(parse_cpu_list("0-3,8,10-11\n", "x"), (std::vector<int>{0, 1, 2, 3, 8, 10, 11}));
  EXPECT_EQ(parse_cpu_list("", "x"), std::vector<int>{});
  EXPECT_EQ(parse_cpu_list("5", "x"), std::vector<int>{5});
  for (const char* bad : {"3-1", "a", "1,,2", "-1", "1-", "0-3x"}) {
    EXPECT_THROW(parse_cpu_list(bad, "x"), Error) << bad;
  }
  FakeSys s;
  s.node(0, "0-z");
  const std::vector<int> all = {0};
  try {
    read_numa_topology(s.root(), &all);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "node0/cpulist: `0-z");
  }
}

NumaTopology fake_topology(int nodes, std::vector<int> cpus = {0, 1}) {
  NumaTopology t;
  t.from_sysfs = nodes > 1;
  for (int i = 0; i < nodes; ++i) {
    NumaNode n;
    n.id = i;
    n.cpus = cpus;  // nodes share this machine's cores: logic, not speed
    n.physical_cores = int(cpus.size());
    n.mem_total_bytes = int64_t(64) << 30;
    t.nodes.push_back(n);
  }
  return t;
}

const ModelConfig& tiny_cfg() { return *find_preset("tiny"); }
const ModelConfig& qwen() { return *find_preset("qwen3-30b-a3b"); }

// Experts of every layer: even ids on cpu:0, odd on cpu:1; attention on cuda:0.
Placement even_odd(const ModelConfig& cfg, Device even, Device odd) {
  Placement p = make_uniform_placement(cfg, Device::cuda(0), even);
  for (LayerPlacement& lp : p.layers) {
    for (size_t e = 1; e < lp.experts.size(); e += 2) lp.experts[e] = odd;
  }
  return p;
}

TEST(NumaPlacement, NodesOfAPlacementAndTheirPresence) {
  const Placement p = even_odd(tiny_cfg(), Device{Device::Cpu, 0}, Device{Device::Cpu, 1});
  EXPECT_EQ(placement_numa_nodes(p), (std::vector<int>{0, 1}));
  EXPECT_TRUE(placement_numa_nodes(make_uniform_placement(tiny_cfg(), Device::cuda(0),
                                                          Device::cpu()))
                  .empty());
  EXPECT_NO_THROW(check_numa_nodes_present(p, fake_topology(2)));
  Placement named = p;
  named.file = "p.yaml";
  try {
    check_numa_nodes_present(named, fake_topology(1));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.exit_code(), 1);
    EXPECT_HAS(e.what(), "p.yaml: cpu:1: no such NUMA node here (this machine has cpu:0); ");
  }
}

// --------------------------------------------------------------------------- memory plan ----

TEST(NumaMemoryPlan, PoolsPerNodeWhenThePlacementNamesNodes) {
  const Device n0{Device::Cpu, 0}, n1{Device::Cpu, 1};
  Budgets b;
  b.bytes["cuda:0"] = 80 * kGiB;
  b.bytes["cpu"] = 200 * kGiB;
  add_numa_budgets(b, {{0, 64 * kGiB}, {1, 192 * kGiB}});
  EXPECT_EQ(b.bytes["cpu:0"], 50 * kGiB);  // MemTotal shares of the host budget
  EXPECT_EQ(b.bytes["cpu:1"], 150 * kGiB);

  const Placement plain = make_uniform_placement(qwen(), Device::cuda(0), Device::cpu());
  const Placement split = even_odd(qwen(), n0, n1);
  const MemoryPlan one = plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, plain, b);
  const MemoryPlan two = plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, split, b);
  ASSERT_EQ(one.per_device.count("cpu"), 1u);
  EXPECT_EQ(one.per_device.count("cpu:0"), 0u);
  ASSERT_EQ(two.per_device.count("cpu:0"), 1u);
  ASSERT_EQ(two.per_device.count("cpu:1"), 1u);
  EXPECT_EQ(two.per_device.count("cpu"), 0u);
  const DeviceUse& all = one.per_device.at("cpu");
  const DeviceUse& a = two.per_device.at("cpu:0");
  const DeviceUse& c = two.per_device.at("cpu:1");
  EXPECT_EQ(a.experts, 48 * 64);
  EXPECT_EQ(c.experts, 48 * 64);
  EXPECT_EQ(a.weights + c.weights, all.weights);  // the experts' bytes, split by node
  EXPECT_EQ(a.weights, c.weights);
  // Each node computes its own experts: each has the expert activation workspace.
  EXPECT_EQ(a.workspace, all.workspace);
  EXPECT_EQ(c.workspace, all.workspace);
  EXPECT_EQ(a.budget, 50 * kGiB);
  EXPECT_EQ(c.budget, 150 * kGiB);
  EXPECT_NO_THROW(check_fits(two));
  // The GPU's numbers do not change (staging counts every CPU expert, on any node).
  EXPECT_EQ(two.per_device.at("cuda:0").total, one.per_device.at("cuda:0").total);
}

TEST(NumaMemoryPlan, BudgetErrorsNameTheNode) {
  const Device n0{Device::Cpu, 0}, n1{Device::Cpu, 1};
  const Placement split = even_odd(qwen(), n0, n1);  // ~7.6 GiB of experts per node
  Budgets b;
  b.bytes["cuda:0"] = 80 * kGiB;
  b.bytes["cpu"] = 20 * kGiB;
  add_numa_budgets(b, {{0, 16 * kGiB}, {1, 64 * kGiB}});  // cpu:0 gets 4 GiB
  std::string m;
  try {
    check_fits(plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, split, b));
    ADD_FAILURE();
  } catch (const Error& e) {
    m = e.what();
  }
  EXPECT_HAS(m, "cpu:0: the plan needs 7.7 GiB (weights 7.6");
  EXPECT_HAS(m, "but the budget is 4.0 GiB; put fewer experts on cpu:0");
  EXPECT_HAS(m, "raise --cpu-mem");
  // --cpu-mem per node.
  apply_budget_overrides(b, "cpu:0=8GiB", "--cpu-mem", Device::Cpu);
  EXPECT_EQ(b.bytes["cpu:0"], 8 * kGiB);
  EXPECT_EQ(b.bytes["cpu:1"], 16 * kGiB);
  EXPECT_NO_THROW(check_fits(plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, split, b)));
  // A whole-host size re-splits the nodes; a node item in the same text wins for its node.
  apply_budget_overrides(b, "cpu:1=30GiB, 40GiB", "--cpu-mem", Device::Cpu);
  EXPECT_EQ(b.bytes["cpu"], 40 * kGiB);
  EXPECT_EQ(b.bytes["cpu:0"], 8 * kGiB);
  EXPECT_EQ(b.bytes["cpu:1"], 30 * kGiB);
  apply_budget_overrides(b, "cpu=40GiB", "--cpu-mem", Device::Cpu);
  EXPECT_EQ(b.bytes["cpu:1"], 32 * kGiB);

  // A node this machine lacks.
  Budgets one_node;
  one_node.bytes["cuda:0"] = 80 * kGiB;
  one_node.bytes["cpu"] = 200 * kGiB;
  add_numa_budgets(one_node, {{0, 256 * kGiB}});
  EXPECT_EQ(one_node.bytes["cpu:0"], 200 * kGiB);  // one node: exactly the host budget
  try {
    check_fits(plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, split, one_node));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.exit_code(), 1);
    EXPECT_HAS(e.what(), "cpu:1: no such NUMA node here (this machine has cpu:0); ");
    EXPECT_HAS(e.what(), "--cpu-mem cpu:1=SIZE");
  }
  // ... unless it has a budget (planning for another machine).
  apply_budget_overrides(one_node, "cpu:1=100GiB", "--cpu-mem", Device::Cpu);
  EXPECT_NO_THROW(
      check_fits(plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, split, one_node)));
}

TEST(NumaMemoryPlan, CpuZeroOnOneNodeIsPlainCpu) {
  Budgets b;
  b.bytes["cuda:0"] = 80 * kGiB;
  b.bytes["cpu"] = 100 * kGiB;
  add_numa_budgets(b, {{0, -1}});
  const MemoryPlan plain = plan_memory(
      qwen(), QuantType::Q4_0, QuantType::Q4_0,
      make_uniform_placement(qwen(), Device::cuda(0), Device::cpu()), b);
  const MemoryPlan node = plan_memory(
      qwen(), QuantType::Q4_0, QuantType::Q4_0,
      make_uniform_placement(qwen(), Device::cuda(0), Device{Device::Cpu, 0}), b);
  const DeviceUse& x = plain.per_device.at("cpu");
  const DeviceUse& y = node.per_device.at("cpu:0");
  EXPECT_EQ(x.total, y.total);
  EXPECT_EQ(x.budget, y.budget);
  EXPECT_EQ(x.experts, y.experts);
}

TEST(NumaMemoryPlan, MixingPlainCpuWithNodesIsRefused) {
  Placement p = even_odd(tiny_cfg(), Device{Device::Cpu, 0}, Device::cpu());
  p.file = "mix.yaml";
  try {
    plan_memory(tiny_cfg(), QuantType::Q8_0, QuantType::Q8_0, p, Budgets{});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "mix.yaml: names NUMA nodes (cpu:N) but also puts layers 0-3");
  }
}

// ------------------------------------------------------------------------ binding memory ----

const ModelWeights& tiny_q8() {
  static const ModelWeights w = load_model("synth:tiny:q8_0");
  return w;
}

struct MbindCall {
  uintptr_t addr;
  unsigned long len;
  int mode;
  int node;
  unsigned flags;
};

TEST(NumaBind, BindsEachNodesExpertRangesToItsNode) {
  const ModelWeights& w = tiny_q8();
  const Placement p = even_odd(w.cfg, Device{Device::Cpu, 0}, Device{Device::Cpu, 1});
  std::vector<MbindCall> calls;
  const MbindFn fake = [&](void* addr, unsigned long len, int mode, const unsigned long* mask,
                           unsigned long maxnode, unsigned flags) -> long {
    int node = -1;
    for (unsigned long b = 0; b < maxnode; ++b) {
      if (mask[b / 64] & (1ul << (b % 64))) {
        EXPECT_EQ(node, -1) << "one node per call";
        node = int(b);
      }
    }
    calls.push_back({reinterpret_cast<uintptr_t>(addr), len, mode, node, flags});
    return 0;
  };
  const NumaBindReport r = bind_experts_to_nodes(w, p, fake_topology(2), fake, false);
  EXPECT_EQ(r.failures, 0);
  EXPECT_TRUE(r.note.empty());
  // 4 layers x 8 experts (alternating nodes) x 3 tensors, one range each.
  EXPECT_EQ(r.ranges, 4 * 8 * 3);
  ASSERT_EQ(calls.size(), size_t(r.ranges));
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  int64_t bytes = 0;
  for (const MbindCall& c : calls) {
    EXPECT_EQ(c.addr % page, 0u);
    EXPECT_EQ(c.len % page, 0u);
    EXPECT_EQ(c.mode, 2);          // MPOL_BIND
    EXPECT_EQ(c.flags, 1u << 1);   // MPOL_MF_MOVE
    // The range lies inside one expert of the right parity.
    bool found = false;
    for (const LayerWeights& lw : w.layers) {
      for (const TensorView* t : {&lw.gate_exps, &lw.up_exps, &lw.down_exps}) {
        for (int64_t e = 0; e < w.cfg.n_experts; ++e) {
          const uintptr_t b = reinterpret_cast<uintptr_t>(t->matrix(e));
          const uintptr_t end = reinterpret_cast<uintptr_t>(t->matrix(e + 1));
          if (c.addr >= b && c.addr + c.len <= end) {
            found = true;
            EXPECT_EQ(c.node, int(e % 2));
          }
        }
      }
    }
    EXPECT_TRUE(found);
    bytes += int64_t(c.len);
  }
  EXPECT_EQ(bytes, r.bytes_bound);
  int64_t expert_bytes = 0;
  for (const LayerWeights& lw : w.layers) {
    expert_bytes += lw.gate_exps.nbytes() + lw.up_exps.nbytes() + lw.down_exps.nbytes();
  }
  EXPECT_EQ(r.bytes_bound + r.bytes_edge, expert_bytes);

  // Runs of experts on one node are one range per tensor.
  calls.clear();
  const Placement halves = [&] {
    Placement q = make_uniform_placement(w.cfg, Device::cuda(0), Device{Device::Cpu, 0});
    for (LayerPlacement& lp : q.layers) {
      for (size_t e = 4; e < lp.experts.size(); ++e) lp.experts[e] = Device{Device::Cpu, 1};
    }
    return q;
  }();
  EXPECT_EQ(bind_experts_to_nodes(w, halves, fake_topology(2), fake, false).ranges, 4 * 2 * 3);
  // One node, or no node named: nothing to do.
  calls.clear();
  EXPECT_EQ(bind_experts_to_nodes(w, halves, fake_topology(1), fake, false).ranges, 0);
  EXPECT_EQ(bind_experts_to_nodes(w, make_uniform_placement(w.cfg, Device::cuda(0), Device::cpu()),
                                  fake_topology(2), fake, false)
                .ranges,
            0);
  EXPECT_TRUE(calls.empty());
}

TEST(NumaBind, FailuresAreCountedNotErrors) {
  const ModelWeights& w = tiny_q8();
  const Placement p = even_odd(w.cfg, Device{Device::Cpu, 0}, Device{Device::Cpu, 1});
  for (int err : {EPERM, ENOSYS}) {
    const MbindFn failing = [err](void*, unsigned long, int, const unsigned long*, unsigned long,
                                  unsigned) -> long {
      errno = err;
      return -1;
    };
    NumaBindReport r;
    EXPECT_NO_THROW(r = bind_experts_to_nodes(w, p, fake_topology(2), failing, false));
    EXPECT_EQ(r.failures, r.ranges);
    EXPECT_GT(r.failures, 0);
    EXPECT_EQ(r.bytes_bound, 0);
    EXPECT_GT(r.bytes_failed, 0);
    EXPECT_EQ(r.first_errno, err);
    EXPECT_HAS(r.note, "could not bind CPU experts to their NUMA nodes (mbind: ");
    EXPECT_HAS(r.note, std::strerror(err));
  }
  // The real syscall on this machine's memory (one node here, or a container forbidding it):
  // whatever it answers, never an error.
  const Placement q = even_odd(w.cfg, Device{Device::Cpu, 0}, Device{Device::Cpu, 0});
  EXPECT_NO_THROW(bind_experts_to_nodes(w, q, fake_topology(2), nullptr, false));
}

// ---------------------------------------------------------------------- per-node CpuMoe -----

std::vector<float> random_h(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> h(static_cast<size_t>(n));
  for (float& v : h) v = nd(rng);
  return h;
}

// The one-pool CpuMoe over ids/wts (in that order).
std::vector<float> one_pool(const ModelWeights& w, int64_t layer, const std::vector<float>& h,
                            const std::vector<int32_t>& ids, const std::vector<float>& wts) {
  ThreadPool pool(2, false);
  CpuMoe moe(w, pool);
  std::vector<float> y(size_t(w.cfg.hidden));
  moe.compute(layer, h.data(), ids.data(), wts.data(), int(ids.size()), y.data());
  return y;
}

NumaCpuMoeOptions test_options(int threads) {
  NumaCpuMoeOptions o;
  o.threads = threads;
  o.pin = false;
  o.bind_memory = false;
  return o;
}

TEST(NumaCpuMoe, NodeSplitIsTheNodesPartialSumsInNodeOrder) {
  const ModelWeights& w = tiny_q8();
  const Device n0{Device::Cpu, 0}, n1{Device::Cpu, 1};
  Placement p = even_odd(w.cfg, n0, n1);
  p.layers[2].experts[5] = Device::cuda(0);  // a GPU expert in the layer
  for (int threads : {1, 2, 3}) {
    NumaCpuMoe moe(w, p, fake_topology(2), test_options(threads));
    ASSERT_EQ(moe.groups(), 2);
    EXPECT_EQ(moe.group_node(0), 0);
    EXPECT_EQ(moe.group_node(1), 1);
    EXPECT_EQ(moe.group_pool(1).size(), threads);
    EXPECT_EQ(moe.threads(), 2 * threads);
    for (int64_t l = 0; l < w.cfg.n_layers; ++l) {
      const std::vector<float> h = random_h(w.cfg.hidden, 100 + uint64_t(l));
      // An unsorted mix of both nodes' experts with made-up weights.
      std::vector<int32_t> ids = {6, 1, 3, 0, 7, 4};
      std::vector<float> wts = {0.3f, 0.1f, 0.25f, 0.15f, 0.12f, 0.08f};
      std::vector<float> y(size_t(w.cfg.hidden), 99.0f);
      moe.compute(l, h.data(), ids.data(), wts.data(), int(ids.size()), y.data());
      // Node 0: 6, 0, 4 in the given order; node 1: 1, 3, 7; summed node 0 + node 1.
      const std::vector<float> y0 = one_pool(w, l, h, {6, 0, 4}, {0.3f, 0.15f, 0.08f});
      const std::vector<float> y1 = one_pool(w, l, h, {1, 3, 7}, {0.1f, 0.25f, 0.12f});
      const std::vector<float> all = one_pool(w, l, h, ids, wts);
      float scale = 0;
      for (float v : all) scale = std::max(scale, std::fabs(v));
      for (int64_t i = 0; i < w.cfg.hidden; ++i) {
        ASSERT_EQ(y[size_t(i)], y0[size_t(i)] + y1[size_t(i)]) << "layer " << l << " row " << i;
        // Against the one pool: float summation order only.
        ASSERT_NEAR(y[size_t(i)], all[size_t(i)], 1e-5f * scale) << "layer " << l;
      }
      // Experts of one node only: exactly the one pool's result.
      const std::vector<int32_t> odd = {3, 1};
      const std::vector<float> ow = {0.6f, 0.4f};
      moe.compute(l, h.data(), odd.data(), ow.data(), 2, y.data());
      EXPECT_EQ(y, one_pool(w, l, h, odd, ow));
      // No expert: zeros.
      moe.compute(l, h.data(), nullptr, nullptr, 0, y.data());
      EXPECT_EQ(y, std::vector<float>(size_t(w.cfg.hidden), 0.0f));
    }
    // An expert the placement keeps on the GPU is refused before any work.
    const std::vector<float> h = random_h(w.cfg.hidden, 1);
    const int32_t gpu_expert = 5;
    const float one = 1.0f;
    std::vector<float> y(size_t(w.cfg.hidden));
    EXPECT_THROW(moe.compute(2, h.data(), &gpu_expert, &one, 1, y.data()), Error);
    EXPECT_THROW(moe.compute(4, h.data(), &gpu_expert, &one, 1, y.data()), Error);
  }
}

// Each node group's work is a moe_cpu span tagged with its node (the profiler's per-node expert
// bandwidth, docs/metrics.md); the caller's thread keeps no node afterwards.
TEST(NumaCpuMoe, NodeGroupsRecordSpansTaggedWithTheirNode) {
  const ModelWeights& w = tiny_q8();
  const Placement p = even_odd(w.cfg, Device{Device::Cpu, 0}, Device{Device::Cpu, 1});
  NumaCpuMoe moe(w, p, fake_topology(2), test_options(1));
  const std::vector<float> h = random_h(w.cfg.hidden, 7);
  const std::vector<int32_t> ids = {0, 1, 2};  // node 0: 0, 2; node 1: 1
  const std::vector<float> wts = {0.5f, 0.3f, 0.2f};
  std::vector<float> y(size_t(w.cfg.hidden));
  trace::start();
  moe.compute(1, h.data(), ids.data(), wts.data(), 3, y.data());
  const std::vector<int32_t> only0 = {2};
  moe.compute(3, h.data(), only0.data(), wts.data(), 1, y.data());
  trace::stop();
  const trace::Collected c = trace::collect();
  std::map<std::pair<int, int>, int> spans;  // (layer, node) -> count
  for (const trace::HostSpan& sp : c.spans) {
    if (sp.phase == trace::Phase::MoeCpu) spans[{sp.arg, sp.node}] += 1;
  }
  EXPECT_EQ(spans, (std::map<std::pair<int, int>, int>{{{1, 0}, 1}, {{1, 1}, 1}, {{3, 0}, 1}}));
  EXPECT_EQ(trace::thread_node(), -1);
}

TEST(NumaCpuMoe, CpuZeroOnOneNodeIsExactlyTheOnePool) {
  const ModelWeights& w = tiny_q8();
  for (const Device d : {Device{Device::Cpu, 0}, Device::cpu()}) {
    const Placement p = make_uniform_placement(w.cfg, Device::cuda(0), d);
    NumaCpuMoe moe(w, p, fake_topology(1), test_options(2));
    EXPECT_EQ(moe.groups(), 1);
    EXPECT_EQ(moe.group_node(0), -1);
    EXPECT_EQ(moe.bind_report().ranges, 0);
    const std::vector<float> h = random_h(w.cfg.hidden, 7);
    const std::vector<int32_t> ids = {4, 2, 7};
    const std::vector<float> wts = {0.5f, 0.3f, 0.2f};
    std::vector<float> y(size_t(w.cfg.hidden));
    moe.compute(1, h.data(), ids.data(), wts.data(), 3, y.data());
    EXPECT_EQ(y, one_pool(w, 1, h, ids, wts)) << d.to_string();
  }
  // Plain cpu on a two-node machine: one pool over the host too.
  NumaCpuMoe plain(w, make_uniform_placement(w.cfg, Device::cuda(0), Device::cpu()),
                   fake_topology(2), test_options(2));
  EXPECT_EQ(plain.groups(), 1);
}

TEST(NumaCpuMoe, RefusesMissingNodesAndPlainCpuNextToNodes) {
  const ModelWeights& w = tiny_q8();
  Placement p = even_odd(w.cfg, Device{Device::Cpu, 0}, Device{Device::Cpu, 2});
  try {
    NumaCpuMoe moe(w, p, fake_topology(2), test_options(1));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "cpu:2: no such NUMA node here (this machine has cpu:0, cpu:1)");
  }
  p = even_odd(w.cfg, Device{Device::Cpu, 1}, Device::cpu());
  try {
    NumaCpuMoe moe(w, p, fake_topology(2), test_options(1));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_HAS(e.what(), "puts experts on plain cpu while other experts name NUMA nodes");
  }
}

TEST(NumaCpuMoe, BindsAtConstructionAndSurvivesRefusal) {
  const ModelWeights& w = tiny_q8();
  const Placement p = even_odd(w.cfg, Device{Device::Cpu, 0}, Device{Device::Cpu, 1});
  NumaCpuMoeOptions o = test_options(1);
  o.bind_memory = true;
  int calls = 0;
  o.mbind = [&calls](void*, unsigned long, int, const unsigned long*, unsigned long,
                     unsigned) -> long {
    ++calls;
    errno = EPERM;
    return -1;
  };
  NumaCpuMoe moe(w, p, fake_topology(2), o);
  EXPECT_GT(calls, 0);
  EXPECT_EQ(moe.bind_report().failures, calls);
  EXPECT_EQ(moe.bind_report().first_errno, EPERM);
  // Still computes.
  const std::vector<float> h = random_h(w.cfg.hidden, 3);
  const std::vector<int32_t> ids = {0, 1};
  const std::vector<float> wts = {0.5f, 0.5f};
  std::vector<float> y(size_t(w.cfg.hidden));
  moe.compute(0, h.data(), ids.data(), wts.data(), 2, y.data());
  const std::vector<float> y0 = one_pool(w, 0, h, {0}, {0.5f});
  const std::vector<float> y1 = one_pool(w, 0, h, {1}, {0.5f});
  for (int64_t i = 0; i < w.cfg.hidden; ++i) ASSERT_EQ(y[size_t(i)], y0[size_t(i)] + y1[size_t(i)]);
}

TEST(NumaThreadPool, ExplicitCpuListSizesAndPinsThePool) {
  ThreadPool unpinned(std::vector<int>{0, 0, 0}, false);
  EXPECT_EQ(unpinned.size(), 3);
  for (int c : unpinned.pinned_cpus()) EXPECT_EQ(c, -1);
  const std::vector<int> mine = host_numa_topology().nodes[0].cpus;
  ThreadPool pinned(std::vector<int>{mine[0], mine.back()}, true);
  EXPECT_EQ(pinned.size(), 2);
  EXPECT_EQ(pinned.pinned_cpus()[0], -1);  // the caller is not pinned
  // Worker 1 gets cpus[1] (or -1 where affinity is forbidden).
  EXPECT_TRUE(pinned.pinned_cpus()[1] == mine.back() || pinned.pinned_cpus()[1] == -1);
  std::atomic<int> ran{0};
  pinned.run([&](int, int) { ran.fetch_add(1); });
  EXPECT_EQ(ran.load(), 2);
}

TEST(NumaEngineChoice, NodePlacementsAreRefusedOnSeveralNodesAndPlainOnOne) {
  using cli::EngineKind;
  const ModelConfig& c = tiny_cfg();
  const Device n0{Device::Cpu, 0}, n1{Device::Cpu, 1};
  // One node: cpu:0 is plain cpu, for the CPU engine and the hybrid one.
  EXPECT_EQ(cli::choose_engine(make_uniform_placement(c, n0, n0), "x", 1), EngineKind::Cpu);
  EXPECT_EQ(cli::choose_engine(make_uniform_placement(c, Device::cuda(0), n0), "x", 1),
            EngineKind::Hybrid);
  // Several nodes: placements naming nodes are refused (not wired into the engines yet) ...
  for (const Placement& p : {make_uniform_placement(c, n0, n0), even_odd(c, n0, n1),
                             make_uniform_placement(c, Device::cuda(0), n1)}) {
    try {
      cli::choose_engine(p, "p.yaml", 2);
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_EQ(e.exit_code(), 1);
      EXPECT_HAS(e.what(), "p.yaml: placements on NUMA nodes (");
      EXPECT_HAS(e.what(), "put the CPU experts on plain cpu (every node)");
    }
  }
  // ... plain cpu is not.
  EXPECT_EQ(cli::choose_engine(make_uniform_placement(c, Device::cuda(0), Device::cpu()), "x", 2),
            EngineKind::Hybrid);
}

}  // namespace
}  // namespace ktune
