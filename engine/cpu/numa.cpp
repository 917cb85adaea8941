// NUMA topology from sysfs and best-effort binding of expert weights to their node (numa.h).
#include "ktune/engine/numa.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "ktune/engine/error.h"
#include "ktune/engine/host_info.h"

#if defined(__linux__)
#include <dirent.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ktune {
namespace {

// From <linux/mempolicy.h> (not every libc ships it).
constexpr int kMpolBind = 2;
constexpr unsigned kMpolMfMove = 1u << 1;

bool read_text(const std::string& path, std::string* out) {
  std::ifstream in(path);
  if (!in) return false;
  std::ostringstream s;
  s << in.rdbuf();
  *out = s.str();
  return true;
}

bool read_long(const std::string& path, long* value) {
  std::ifstream in(path);
  return static_cast<bool>(in >> *value);
}

std::vector<int> process_allowed_cpus() {
  std::vector<int> cpus;
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
    }
  }
#endif
  if (cpus.empty()) cpus.push_back(0);
  return cpus;
}

// Node ids that have a directory `root`/node/nodeN, sorted.
std::vector<int> list_node_dirs(const std::string& root) {
  std::vector<int> ids;
#if defined(__linux__)
  DIR* dir = opendir((root + "/node").c_str());
  if (dir == nullptr) return ids;
  while (const dirent* e = readdir(dir)) {
    const char* name = e->d_name;
    if (std::strncmp(name, "node", 4) != 0 || name[4] == '\0') continue;
    bool digits = true;
    for (const char* c = name + 4; *c != '\0'; ++c) digits = digits && *c >= '0' && *c <= '9';
    if (digits && std::strlen(name + 4) < 8) ids.push_back(std::atoi(name + 4));
  }
  closedir(dir);
#else
  (void)root;
#endif
  std::sort(ids.begin(), ids.end());
  return ids;
}

// "Node 0 MemTotal:       131072 kB" -> bytes of `key`, -1 when absent.
int64_t meminfo_bytes(const std::string& text, const std::string& key) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const size_t k = line.find(key + ":");
    if (k == std::string::npos) continue;
    long long kb = -1;
    if (std::sscanf(line.c_str() + k + key.size() + 1, "%lld", &kb) == 1 && kb >= 0) {
      return static_cast<int64_t>(kb) * 1024;
    }
  }
  return -1;
}

// Orders a node's CPUs: first CPU of each physical core, then the siblings.
void order_by_core(const std::string& root, NumaNode& node) {
  std::map<std::pair<long, long>, int> first_of_core;
  std::vector<int> own_core;  // CPUs without readable topology: each is its own core
  for (int cpu : node.cpus) {
    const std::string dir = root + "/cpu/cpu" + std::to_string(cpu) + "/topology/";
    long package = 0, core = 0;
    if (!read_long(dir + "physical_package_id", &package) || !read_long(dir + "core_id", &core)) {
      own_core.push_back(cpu);
      continue;
    }
    auto it = first_of_core.find({package, core});
    if (it == first_of_core.end()) {
      first_of_core.emplace(std::make_pair(package, core), cpu);
    } else {
      it->second = std::min(it->second, cpu);
    }
  }
  std::vector<int> firsts = own_core;
  for (const auto& kv : first_of_core) firsts.push_back(kv.second);
  std::sort(firsts.begin(), firsts.end());
  const std::set<int> first_set(firsts.begin(), firsts.end());
  std::vector<int> ordered = firsts;
  for (int cpu : node.cpus) {
    if (first_set.count(cpu) == 0) ordered.push_back(cpu);
  }
  node.cpus = ordered;
  node.physical_cores = static_cast<int>(firsts.size());
}

}  // namespace

std::vector<int> parse_cpu_list(const std::string& text, const std::string& where) {
  std::vector<int> out;
  std::string t;
  for (char c : text) {
    if (c != ' ' && c != '\n' && c != '\t' && c != '\r') t += c;
  }
  if (t.empty()) return out;
  size_t pos = 0;
  while (pos <= t.size()) {
    size_t comma = t.find(',', pos);
    if (comma == std::string::npos) comma = t.size();
    const std::string item = t.substr(pos, comma - pos);
    int a = -1, b = -1;
    char extra = 0;
    const size_t dash = item.find('-');
    bool ok = false;
    if (dash == std::string::npos) {
      ok = std::sscanf(item.c_str(), "%d%c", &a, &extra) == 1;
      b = a;
    } else {
      ok = std::sscanf(item.substr(0, dash).c_str(), "%d%c", &a, &extra) == 1 &&
           std::sscanf(item.substr(dash + 1).c_str(), "%d%c", &b, &extra) == 1;
    }
    if (!ok || a < 0 || b < a || b >= (1 << 20)) {
      throw Error(where, "`" + text + "` is not a CPU list", "expected e.g. 0-3,8-11");
    }
    for (int c = a; c <= b; ++c) out.push_back(c);
    pos = comma + 1;
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

const NumaNode* NumaTopology::find(int id) const {
  for (const NumaNode& n : nodes) {
    if (n.id == id) return &n;
  }
  return nullptr;
}

std::string NumaTopology::device_names() const {
  std::string s;
  for (const NumaNode& n : nodes) s += (s.empty() ? "" : ", ") + Device{Device::Cpu, n.id}.to_string();
  return s;
}

NumaTopology read_numa_topology(const std::string& sys_root, const std::vector<int>* allowed) {
  const std::vector<int> allowed_list = allowed ? *allowed : process_allowed_cpus();
  const std::set<int> allowed_set(allowed_list.begin(), allowed_list.end());
  NumaTopology t;
  for (int id : list_node_dirs(sys_root)) {
    const std::string dir = sys_root + "/node/node" + std::to_string(id) + "/";
    std::string text;
    if (!read_text(dir + "cpulist", &text)) continue;
    NumaNode n;
    n.id = id;
    for (int c : parse_cpu_list(text, dir + "cpulist")) {
      if (allowed_set.count(c) != 0) n.cpus.push_back(c);
    }
    if (n.cpus.empty()) continue;  // memory-only node, or outside our CPU mask
    if (read_text(dir + "meminfo", &text)) {
      n.mem_total_bytes = meminfo_bytes(text, "MemTotal");
      n.mem_free_bytes = meminfo_bytes(text, "MemFree");
    }
    order_by_core(sys_root, n);
    t.nodes.push_back(std::move(n));
  }
  t.from_sysfs = !t.nodes.empty();
  if (t.nodes.empty()) {
    NumaNode n;
    n.id = 0;
    n.cpus = allowed_list;
    order_by_core(sys_root, n);
    t.nodes.push_back(std::move(n));
  }
  return t;
}

const NumaTopology& host_numa_topology() {
  static const NumaTopology topo = [] {
    NumaTopology t = read_numa_topology();
    if (t.nodes.size() == 1 && t.nodes[0].mem_total_bytes < 0) {
      t.nodes[0].mem_total_bytes = host_memory_bytes();
    }
    return t;
  }();
  return topo;
}

std::vector<int> placement_numa_nodes(const Placement& p) {
  std::set<int> ids;
  for (const LayerPlacement& lp : p.layers) {
    if (lp.attention.is_cpu() && lp.attention.index >= 0) ids.insert(lp.attention.index);
    for (const Device& d : lp.experts) {
      if (d.is_cpu() && d.index >= 0) ids.insert(d.index);
    }
  }
  return {ids.begin(), ids.end()};
}

void check_numa_nodes_present(const Placement& p, const NumaTopology& topo) {
  for (int id : placement_numa_nodes(p)) {
    if (topo.find(id) != nullptr) continue;
    const std::string dev = Device{Device::Cpu, id}.to_string();
    throw Error((p.file.empty() ? "" : p.file + ": ") + dev,
                "no such NUMA node here (this machine has " + topo.device_names() + ")",
                "put the experts on the nodes this machine has, or on plain cpu (all nodes)");
  }
}

// ------------------------------------------------------------------------ node-local memory --

long mbind_syscall(void* addr, unsigned long len, int mode, const unsigned long* nodemask,
                   unsigned long maxnode, unsigned flags) {
#if defined(__linux__) && defined(SYS_mbind)
  return syscall(SYS_mbind, addr, len, mode, nodemask, maxnode, flags);
#else
  (void)addr, (void)len, (void)mode, (void)nodemask, (void)maxnode, (void)flags;
  errno = ENOSYS;
  return -1;
#endif
}

NumaBindReport bind_experts_to_nodes(const ModelWeights& w, const Placement& p,
                                     const NumaTopology& topo, const MbindFn& mbind, bool warn) {
  NumaBindReport r;
  if (topo.size() <= 1 || placement_numa_nodes(p).empty()) return r;
  check_numa_nodes_present(p, topo);
  const MbindFn call = mbind ? mbind : MbindFn(mbind_syscall);
#if defined(__linux__)
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
#else
  const uintptr_t page = 4096;
#endif
  constexpr int kMaskWords = 16;  // node ids up to 1023
  auto bind = [&](const uint8_t* begin, const uint8_t* end, int node) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(begin), e = reinterpret_cast<uintptr_t>(end);
    const uintptr_t pb = (b + page - 1) / page * page, pe = e / page * page;
    if (pe <= pb) {
      r.bytes_edge += static_cast<int64_t>(e - b);
      return;
    }
    r.bytes_edge += static_cast<int64_t>((pb - b) + (e - pe));
    unsigned long mask[kMaskWords] = {};
    if (node < 0 || node >= 64 * kMaskWords) return;
    mask[node / 64] |= 1ul << (node % 64);
    ++r.ranges;
    errno = 0;
    const long rc = call(reinterpret_cast<void*>(pb), static_cast<unsigned long>(pe - pb),
                         kMpolBind, mask, 64ul * kMaskWords, kMpolMfMove);
    if (rc == 0) {
      r.bytes_bound += static_cast<int64_t>(pe - pb);
      return;
    }
    const int err = errno != 0 ? errno : EINVAL;
    if (r.failures++ == 0) {
      r.first_errno = err;
      r.note = std::string("could not bind CPU experts to their NUMA nodes (mbind: ") +
               std::strerror(err) + "); they stay where the kernel put them";
    }
    r.bytes_failed += static_cast<int64_t>(pe - pb);
  };
  for (int64_t l = 0; l < p.n_layers() && l < static_cast<int64_t>(w.layers.size()); ++l) {
    const LayerPlacement& lp = p.layers[size_t(l)];
    const LayerWeights& lw = w.layers[size_t(l)];
    const int64_t ne = static_cast<int64_t>(lp.experts.size());
    for (int64_t e = 0; e < ne;) {
      const Device d = lp.experts[size_t(e)];
      int64_t end = e + 1;
      while (end < ne && lp.experts[size_t(end)] == d) ++end;
      if (d.is_cpu() && d.index >= 0) {
        for (const TensorView* t : {&lw.gate_exps, &lw.up_exps, &lw.down_exps}) {
          if (t->data == nullptr || t->ne[2] != ne) continue;
          bind(t->matrix(e), t->matrix(end), d.index);
        }
      }
      e = end;
    }
  }
  if (r.failures > 0 && warn) {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) std::fprintf(stderr, "ktune: warning: %s\n", r.note.c_str());
  }
  return r;
}

}  // namespace ktune
