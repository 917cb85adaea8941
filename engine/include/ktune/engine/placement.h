// The placement: which device runs each layer's attention and holds each expert, plus the runtime
// switches of a run. It is read from and written to the native placement YAML (design §6,
// docs/placement.md):
//
//   ktune: 1
//   model: {path: model.gguf, arch: qwen3moe}
//   runtime: {cuda_graph: true, moe_kernel: fused, cpu_handoff: flags, cpu_threads: 0, ...}
//            (gpu_transport: auto|nccl|peer, written only when not auto)
//   layers:
//     - {layers: "0-23", attention: cuda:0, experts: {cuda:0: all}}
//     - {layers: "24-47", attention: cuda:0, experts: {cuda:0: "3,17,42", cpu: rest}}
//
// Reading is two-phase because the file names the model it is for: parse_placement() checks the
// file on its own (syntax, keys, types, ranges, overlaps) and keeps the layer entries as written;
// resolve_placement() expands them against the model's shape into one device per layer's
// attention and one per expert. Passing the ModelConfig to parse_placement() does both.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "ktune/engine/model.h"

namespace ktune {

// A device name as written in placements, profiles and reports: `cpu` (all of the host),
// `cpu:N` (NUMA node N; placement on nodes comes with a later issue) or `cuda:N`.
struct Device {
  enum Kind { Cpu = 0, Cuda = 1 };
  Kind kind = Cpu;
  int index = -1;  // -1 only for plain `cpu`

  static Device cpu() { return Device{Cpu, -1}; }
  static Device cuda(int i) { return Device{Cuda, i}; }
  // Parses the canonical spellings only ("cuda:01" and "CUDA:0" are rejected, so every device has
  // one name). Throws ktune::Error naming `where` and listing the valid forms.
  static Device parse(const std::string& text, const std::string& where);
  // Same, nullopt instead of an exception.
  static std::optional<Device> try_parse(const std::string& text);

  std::string to_string() const;
  bool is_gpu() const { return kind == Cuda; }
  bool is_cpu() const { return kind == Cpu; }
  // Every CPU device shares the host's memory: the memory planner counts them under `cpu`.
  std::string memory_pool() const { return is_cpu() ? std::string("cpu") : to_string(); }
};
bool operator==(const Device& a, const Device& b);
bool operator!=(const Device& a, const Device& b);
bool operator<(const Device& a, const Device& b);  // cpu < cpu:0 < cpu:1 < cuda:0 < cuda:1

enum class MoeKernel { Fused, Unfused };
enum class CpuHandoff { Flags, HostNode };
const char* moe_kernel_name(MoeKernel k);    // "fused" | "unfused"
const char* cpu_handoff_name(CpuHandoff h);  // "flags" | "host_node"

// How the hidden state (and the sampled token) moves between the GPUs of a multi-GPU layer split
// (ktune/engine/gpu_stages.h).
enum class GpuTransport {
  Auto,  // measured at load: the faster of the two on this machine (docs/placement.md)
  Nccl,  // ncclSend/ncclRecv, one communicator per GPU (ncclCommInitAll)
  Peer   // cudaMemcpyPeerAsync ordered by events; staged through pinned host memory when the
         // two GPUs have no peer access
};
const char* gpu_transport_name(GpuTransport t);  // "auto" | "nccl" | "peer"
// "auto" | "nccl" | "peer" -> the value; throws a usage error naming `where` otherwise.
GpuTransport parse_gpu_transport(const std::string& text, const std::string& where);

struct RuntimeOptions {
  bool cuda_graph = true;
  MoeKernel moe_kernel = MoeKernel::Fused;
  CpuHandoff cpu_handoff = CpuHandoff::Flags;
  int cpu_threads = 0;     // 0 = one per physical core (hybrid engine: one fewer, see thread_pool.h)
  int64_t context = 4096;  // KV cache length, tokens per sequence
  int64_t batch = 1;       // sequences decoded together
  GpuTransport gpu_transport = GpuTransport::Auto;  // multi-GPU placements only
  // PCIe assist, in thousandths (YAML `pcie_assist: 0.375`; 0 = off): of each token's CPU
  // experts in a layer, the GPU computes floor(n * share) reading their weights from host memory
  // over PCIe while the CPU computes the rest (fused MoE, hybrid placements on one GPU).
  int pcie_assist_permille = 0;
};
constexpr int kMaxPcieAssistPermille = 950;
// "0.375" for 375, "off" for 0.
std::string pcie_assist_text(int permille);
// "off" | a share in [0, 0.95] -> thousandths; throws a usage error naming `where` otherwise.
int parse_pcie_assist(const std::string& text, const std::string& where);

// Written by `ktune search`; kept so that parse + write gives the file back.
struct Predicted {
  std::optional<double> decode_tok_s;
  std::optional<double> prefill_tok_s;
  std::map<Device, double> memory_gib;
};
struct SearchedOn {
  std::string profile;
  std::string router_stats;
};

// Which experts of one layer entry a device key takes.
struct ExpertRule {
  enum Kind { All, Rest, List };
  Device device;
  Kind kind = List;
  std::vector<int64_t> ids;  // List: sorted, unique
  int line = 0;              // 1-based line in the file, for errors found when resolving
};

// One entry of `layers:` as written (layer ids expanded, sorted).
struct LayerEntry {
  std::vector<int64_t> layers;
  std::optional<Device> attention;  // absent: the default attention device
  std::vector<ExpertRule> experts;  // in file order
  int line = 0;
  int layers_line = 0;  // line of the `layers:` key inside the entry
};

// Where one layer runs.
struct LayerPlacement {
  Device attention;
  std::vector<Device> experts;  // one per expert id
};
bool operator==(const LayerPlacement& a, const LayerPlacement& b);

struct Placement {
  int version = 1;
  std::string model_path;      // as written
  std::string model_resolved;  // absolute, relative paths taken from the YAML's folder; a model
                               // spec that is not a path (synth:...) is kept as is
  std::string arch;            // empty: not stated (the model file decides)
  RuntimeOptions runtime;
  std::vector<LayerEntry> entries;     // as parsed (empty for placements built in code)
  std::vector<LayerPlacement> layers;  // resolved: one per model layer (empty until resolved)
  std::optional<Predicted> predicted;
  std::optional<SearchedOn> searched_on;
  std::string file;   // where it was read from ("" when built in code), for messages
  int arch_line = 0;  // line of model.arch, for the resolver's message

  bool resolved() const { return !layers.empty(); }
  int64_t n_layers() const { return static_cast<int64_t>(layers.size()); }
  int64_t n_experts() const { return layers.empty() ? 0 : int64_t(layers[0].experts.size()); }
  // The device uncovered layers take for attention: the lowest-numbered GPU named by any entry
  // (attention or experts), else cpu.
  Device default_attention() const;
  // Every device the resolved placement uses, sorted.
  std::vector<Device> devices() const;
};
// Equality of what a file says: version, model path and arch, runtime, the resolved layers (or,
// when both are unresolved, the entries' meaning), predicted and searched_on. The resolved path
// and the file name are derived from where a file was read and are not compared.
bool operator==(const Placement& a, const Placement& b);
bool operator!=(const Placement& a, const Placement& b);

// Parses placement YAML. `file_name` is used in messages (file:line) and its folder resolves a
// relative model path (empty: the current folder). With `cfg`, the result is resolved and every
// layer and expert id is checked against the model. Throws ktune::Error (runtime kind, exit
// code 1) naming file:line and the field.
Placement parse_placement(const std::string& yaml_text, const std::string& file_name,
                          const ModelConfig* cfg = nullptr);
// Reads and parses a file (throws when it cannot be read).
Placement load_placement(const std::string& path, const ModelConfig* cfg = nullptr);

// Expands p.entries into p.layers for a model of `cfg`: checks layer and expert ranges and the
// arch, applies `all`/`rest`, and fills uncovered layers (attention on p.default_attention(),
// experts on cpu) and experts an entry does not name (cpu). Throws ktune::Error naming
// file:line. A placement that already has layers (built in code, or resolved before) is only
// checked for its shape: its layers are never rebuilt from the entries.
void resolve_placement(Placement& p, const ModelConfig& cfg);

// The standard form (docs/placement.md): fixed key order, every runtime field written, one flow
// map per run of consecutive identical layers, expert ids as compact ranges, `all` when one
// device holds every expert of a layer, else `rest` for the device holding most (ties: the
// first in device order). parse(write(p)) == p and write(parse(write(p))) == write(p).
// Throws ktune::Error when p is not resolved.
std::string write_placement(const Placement& p);
// Writes atomically (never a half-written file under `path`).
void save_placement(const std::string& path, const Placement& p);

// Helpers for the search and the engine.

// Experts per device of layer `layer` / of the whole model (resolved placements).
std::map<Device, int64_t> expert_counts(const Placement& p, int64_t layer);
std::map<Device, int64_t> expert_counts(const Placement& p);
// Every layer: attention on `attention`, every expert on `experts`.
Placement make_uniform_placement(const ModelConfig& cfg, Device attention, Device experts);
// Attention of every layer on `gpu`; the experts of `gpu_layers` layers on `gpu` (the first
// layers, or the last with from_end), the other layers' experts on cpu.
Placement make_layer_split(const ModelConfig& cfg, int64_t gpu_layers, Device gpu,
                           bool from_end = false);

// "0-3,8,10-11" <-> sorted unique ids. format_id_ranges() gives the compact form;
// parse_id_ranges() throws ktune::Error naming `where` on malformed text ("5-3", "a-b", "-1",
// empty items, repeats) or ids >= limit.
std::string format_id_ranges(const std::vector<int64_t>& sorted_ids);
std::vector<int64_t> parse_id_ranges(const std::string& text, int64_t limit,
                                     const std::string& where, const std::string& what);

// The file format's version this ktune reads and writes.
constexpr int kPlacementVersion = 1;

}  // namespace ktune
