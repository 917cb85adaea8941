// Placement YAML: parsing (defaults, uncovered layers, relative paths), every error case (file:line
// and field in the message), hostile documents, the standard form and round trips.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"

namespace {

using ktune::Device;
using ktune::Placement;

const ktune::ModelConfig& qwen() { return *ktune::find_preset("qwen3-30b-a3b"); }
const ktune::ModelConfig& tiny() { return *ktune::find_preset("tiny"); }

#define EXPECT_HAS(text, part)                               \
  EXPECT_NE(std::string(text).find(part), std::string::npos) \
      << "expected to find [" << (part) << "] in [" << (text) << "]"

// The message of the ktune::Error that parsing `text` (as p.yaml) throws; fails the test when
// it throws anything else or nothing.
std::string parse_error(const std::string& text, const ktune::ModelConfig* cfg = &qwen()) {
  try {
    ktune::parse_placement(text, "p.yaml", cfg);
  } catch (const ktune::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a ktune::Error: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no error for:\n" << text;
  return "";
}

const std::string kHead = "ktune: 1\nmodel: {path: model.gguf}\n";  // lines 1-2

const char* const kDesignExample = R"(ktune: 1
model: {path: model.gguf, arch: qwen3moe}
runtime: {cuda_graph: true, moe_kernel: fused, cpu_threads: 16, context: 4096}
layers:
  - {layers: "0-23",  attention: cuda:0, experts: {cuda:0: all}}
  - {layers: "24-47", attention: cuda:0, experts: {cuda:0: [3, 17, 42], cpu: rest}}
predicted: {decode_tok_s: 0.0, prefill_tok_s: 0.0, memory_gib: {cuda:0: 0.0}}   # written by search
searched_on: {profile: profile.json, router_stats: sha256-of-the-stats}        # written by search
)";

// ---------------------------------------------------------------------------------- devices --

TEST(PlacementDevice, ParsesCanonicalNames) {
  EXPECT_EQ(Device::parse("cpu", "f"), Device::cpu());
  EXPECT_EQ(Device::parse("cpu:0", "f"), (Device{Device::Cpu, 0}));
  EXPECT_EQ(Device::parse("cuda:1", "f"), Device::cuda(1));
  for (const char* s : {"cpu", "cpu:0", "cpu:3", "cuda:0", "cuda:7", "cuda:12"}) {
    EXPECT_EQ(Device::parse(s, "f").to_string(), s);
  }
  EXPECT_LT(Device::cpu(), (Device{Device::Cpu, 0}));
  EXPECT_LT((Device{Device::Cpu, 1}), Device::cuda(0));
  EXPECT_LT(Device::cuda(2), Device::cuda(10));
}

TEST(PlacementDevice, RejectsOtherSpellings) {
  for (const char* s : {"", "cuda", "gpu:0", "CUDA:0", "cuda:01", "cuda:-1", "cuda:1024",
                        "cpu:", "cuda:1 ", "cuda:x", "npu:0"}) {
    try {
      Device::parse(s, "--device");
      ADD_FAILURE() << "accepted " << s;
    } catch (const ktune::Error& e) {
      EXPECT_HAS(e.what(), "--device: ");
      EXPECT_HAS(e.what(), "cpu, cpu:N (NUMA node N) or cuda:N");
    }
  }
  try {
    Device::parse("cuda", "f");
  } catch (const ktune::Error& e) {
    EXPECT_HAS(e.what(), "did you mean cuda:0?");
  }
}

// -------------------------------------------------------------------------------- id ranges --

TEST(PlacementRanges, ParseAndFormat) {
  EXPECT_EQ(ktune::parse_id_ranges("0-3,8,10-11", 48, "f", "layer"),
            (std::vector<int64_t>{0, 1, 2, 3, 8, 10, 11}));
  EXPECT_EQ(ktune::parse_id_ranges(" 5 ", 48, "f", "layer"), (std::vector<int64_t>{5}));
  EXPECT_EQ(ktune::parse_id_ranges("11-11, 2", 48, "f", "layer"), (std::vector<int64_t>{2, 11}));
  EXPECT_EQ(ktune::format_id_ranges({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
  EXPECT_EQ(ktune::format_id_ranges({5}), "5");
  EXPECT_EQ(ktune::format_id_ranges({}), "");
  for (const char* bad :
       {"5-3", "a-b", "-1", "1,,2", "", "0-3,2", "1-", "48", "3.5", "0x3", "1 2", "9999999999"}) {
    EXPECT_THROW(ktune::parse_id_ranges(bad, 48, "f", "layer"), ktune::Error) << bad;
  }
  try {
    ktune::parse_id_ranges("5-3", 48, "p.yaml:4", "layer");
  } catch (const ktune::Error& e) {
    EXPECT_HAS(e.what(), "p.yaml:4: range `5-3` runs backwards");
  }
}

// ------------------------------------------------------------------------------- parsing -----

TEST(PlacementParse, DesignExample) {
  const Placement p = ktune::parse_placement(kDesignExample, "cfg/best.yaml", &qwen());
  EXPECT_EQ(p.version, 1);
  EXPECT_EQ(p.model_path, "model.gguf");
  EXPECT_EQ(p.arch, "qwen3moe");
  EXPECT_TRUE(p.runtime.cuda_graph);
  EXPECT_EQ(p.runtime.moe_kernel, ktune::MoeKernel::Fused);
  EXPECT_EQ(p.runtime.cpu_handoff, ktune::CpuHandoff::Flags);
  EXPECT_EQ(p.runtime.cpu_threads, 16);
  EXPECT_EQ(p.runtime.context, 4096);
  EXPECT_EQ(p.runtime.batch, 1);
  ASSERT_EQ(p.n_layers(), 48);
  ASSERT_EQ(p.n_experts(), 128);
  for (int64_t l = 0; l < 48; ++l) {
    EXPECT_EQ(p.layers[l].attention, Device::cuda(0));
    const auto counts = ktune::expert_counts(p, l);
    if (l < 24) {
      EXPECT_EQ(counts, (std::map<Device, int64_t>{{Device::cuda(0), 128}}));
    } else {
      EXPECT_EQ(counts, (std::map<Device, int64_t>{{Device::cpu(), 125}, {Device::cuda(0), 3}}));
      EXPECT_EQ(p.layers[l].experts[17], Device::cuda(0));
      EXPECT_EQ(p.layers[l].experts[18], Device::cpu());
    }
  }
  EXPECT_EQ(ktune::expert_counts(p),
            (std::map<Device, int64_t>{{Device::cpu(), 24 * 125}, {Device::cuda(0), 24 * 131}}));
  ASSERT_TRUE(p.predicted.has_value());
  EXPECT_EQ(p.predicted->decode_tok_s, 0.0);
  EXPECT_EQ(p.predicted->memory_gib.at(Device::cuda(0)), 0.0);
  ASSERT_TRUE(p.searched_on.has_value());
  EXPECT_EQ(p.searched_on->profile, "profile.json");
  EXPECT_EQ(p.searched_on->router_stats, "sha256-of-the-stats");
  EXPECT_EQ(p.devices(), (std::vector<Device>{Device::cpu(), Device::cuda(0)}));
}

TEST(PlacementParse, DefaultsAndUncoveredLayers) {
  // No GPU named anywhere: everything on the CPU.
  Placement p = ktune::parse_placement(kHead + "layers: []\n", "p.yaml", &tiny());
  EXPECT_TRUE(p.runtime.cuda_graph);
  EXPECT_EQ(p.runtime.moe_kernel, ktune::MoeKernel::Fused);
  EXPECT_EQ(p.runtime.cpu_handoff, ktune::CpuHandoff::Flags);
  EXPECT_EQ(p.runtime.cpu_threads, 0);
  EXPECT_EQ(p.runtime.context, 4096);
  EXPECT_EQ(p.runtime.batch, 1);
  EXPECT_EQ(p.arch, "");
  EXPECT_FALSE(p.predicted.has_value());
  EXPECT_FALSE(p.searched_on.has_value());
  ASSERT_EQ(p.n_layers(), 4);
  for (const auto& l : p.layers) {
    EXPECT_EQ(l.attention, Device::cpu());
    EXPECT_EQ(l.experts, std::vector<Device>(8, Device::cpu()));
  }
  // Uncovered layers: attention on the lowest-numbered GPU named anywhere, experts on cpu. An
  // entry without `attention` takes the same default; experts it does not name go to cpu.
  p = ktune::parse_placement(kHead + R"(layers:
  - {layers: 1, attention: cuda:2, experts: {cuda:1: [0, 1]}}
  - {layers: 2, experts: {cuda:3: "4-5", cpu:0: rest}}
  - {layers: 3, attention: cpu}
)",
                             "p.yaml", &tiny());
  EXPECT_EQ(p.layers[0].attention, Device::cuda(1));
  EXPECT_EQ(p.layers[0].experts, std::vector<Device>(8, Device::cpu()));
  EXPECT_EQ(p.layers[1].attention, Device::cuda(2));
  EXPECT_EQ(p.layers[1].experts[0], Device::cuda(1));
  EXPECT_EQ(p.layers[1].experts[2], Device::cpu());
  EXPECT_EQ(p.layers[2].attention, Device::cuda(1));
  EXPECT_EQ(p.layers[2].experts[4], Device::cuda(3));
  EXPECT_EQ(p.layers[2].experts[0], (Device{Device::Cpu, 0}));
  EXPECT_EQ(p.layers[3].attention, Device::cpu());
  EXPECT_EQ(p.layers[3].experts, std::vector<Device>(8, Device::cpu()));
}

TEST(PlacementParse, AcceptedSpellings) {
  // Layers as an int, a range string, a list; experts as an int, ranges, lists of either.
  const Placement p = ktune::parse_placement(kHead + R"(runtime:
  cuda_graph: False
  moe_kernel: unfused
  cpu_handoff: host_node
  batch: 4
layers:
  - layers: 0
    attention: cuda:0
    experts:
      cuda:0: 3
      cuda:1: [0, "1-2"]
      cpu: rest
  - {layers: [1, 2], experts: {cuda:0: all}}
  - {layers: "3", experts: {cpu: "0-7"}}
)",
                                             "p.yaml", &tiny());
  EXPECT_FALSE(p.runtime.cuda_graph);
  EXPECT_EQ(p.runtime.moe_kernel, ktune::MoeKernel::Unfused);
  EXPECT_EQ(p.runtime.cpu_handoff, ktune::CpuHandoff::HostNode);
  EXPECT_EQ(p.runtime.batch, 4);
  EXPECT_EQ(p.layers[0].experts[3], Device::cuda(0));
  EXPECT_EQ(p.layers[0].experts[2], Device::cuda(1));
  EXPECT_EQ(p.layers[0].experts[7], Device::cpu());
  EXPECT_EQ(p.layers[2].experts, std::vector<Device>(8, Device::cuda(0)));
  EXPECT_EQ(p.layers[3].experts, std::vector<Device>(8, Device::cpu()));
}

TEST(PlacementParse, WithoutModelThenResolve) {
  Placement p = ktune::parse_placement(kDesignExample, "p.yaml", nullptr);
  EXPECT_FALSE(p.resolved());
  ASSERT_EQ(p.entries.size(), 2u);
  EXPECT_EQ(p.entries[1].layers.front(), 24);
  EXPECT_EQ(p.entries[1].line, 6);
  EXPECT_THROW(ktune::write_placement(p), ktune::Error);
  ktune::resolve_placement(p, qwen());
  EXPECT_TRUE(p.resolved());
  EXPECT_EQ(p, ktune::parse_placement(kDesignExample, "p.yaml", &qwen()));
  // The same file against a smaller model: layer 24 is out of range, named with its line.
  Placement q = ktune::parse_placement(kDesignExample, "p.yaml", nullptr);
  try {
    ktune::resolve_placement(q, tiny());
    ADD_FAILURE() << "resolved against tiny";
  } catch (const ktune::Error& e) {
    EXPECT_HAS(e.what(), "p.yaml:5: layers[0].layers: layer 4 is out of range");
    EXPECT_HAS(e.what(), "the model has 4 layers (0-3)");
  }
}

TEST(PlacementParse, RelativeModelPaths) {
  namespace fs = std::filesystem;
  const std::string text = "ktune: 1\nmodel: {path: ../models/m.gguf}\nlayers: []\n";
  Placement p = ktune::parse_placement(text, "/srv/ktune/configs/best.yaml");
  EXPECT_EQ(p.model_path, "../models/m.gguf");
  EXPECT_EQ(p.model_resolved, "/srv/ktune/models/m.gguf");
  p = ktune::parse_placement(text, "configs/best.yaml");
  EXPECT_EQ(p.model_resolved, (fs::current_path() / "models/m.gguf").lexically_normal().string());
  p = ktune::parse_placement(text, "");
  EXPECT_EQ(p.model_resolved,
            (fs::current_path() / "../models/m.gguf").lexically_normal().string());
  p = ktune::parse_placement("ktune: 1\nmodel: {path: /data/m.gguf}\nlayers: []\n", "a/b.yaml");
  EXPECT_EQ(p.model_resolved, "/data/m.gguf");
  p = ktune::parse_placement("ktune: 1\nmodel: {path: synth:tiny:q8_0}\nlayers: []\n", "a/b.yaml");
  EXPECT_EQ(p.model_resolved, "synth:tiny:q8_0");
}

// -------------------------------------------------------------------------------- errors -----

TEST(PlacementErrors, VersionAndRequiredFields) {
  std::string m = parse_error("ktune: 2\nmodel: {path: m.gguf}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:1: ktune: 2 is newer than this ktune supports (1); upgrade ktune");
  m = parse_error("ktune: 0\nmodel: {path: m.gguf}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:1: ktune: 0 is not a placement format version");
  m = parse_error("ktune: \"1\"\nmodel: {path: m.gguf}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:1: ktune: must be a whole number");
  m = parse_error("ktune: 1.0\nmodel: {path: m.gguf}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:1: ktune: `1.0` is not a whole number");
  m = parse_error("model: {path: m.gguf}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:1: ktune: missing");
  m = parse_error("ktune: 1\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:1: model.path: missing");
  m = parse_error("ktune: 1\nmodel: {arch: qwen3moe}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:2: model.path: missing");
  m = parse_error("ktune: 1\nmodel: {path: \"\"}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:2: model.path: is empty");
  m = parse_error("ktune: 1\nmodel: m.gguf\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:2: model: must be a map");
  m = parse_error(kHead);
  EXPECT_HAS(m, "p.yaml:1: layers: missing");
  m = parse_error(kHead + "layers:\n");
  EXPECT_HAS(m, "p.yaml:3: layers: missing");
  m = parse_error(kHead + "layers: 5\n");
  EXPECT_HAS(m, "p.yaml:3: layers: must be a list of entries");
  m = parse_error(kHead + "layers:\n  - {attention: cpu}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].layers: missing");
  m = parse_error("ktune: 1\nmodel: {path: m.gguf, arch: deepseek2}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:2: model.arch: the file says deepseek2 but the model is qwen3moe");
  m = parse_error("");
  EXPECT_HAS(m, "p.yaml: the file is empty");
  m = parse_error("# only a comment\n");
  EXPECT_HAS(m, "p.yaml: the file is empty");
  m = parse_error(kHead + "layers: []\n---\nktune: 1\n");
  EXPECT_HAS(m, "p.yaml:5: document: the file holds more than one YAML document");
  // Found by tests/fuzz/fuzz_placement: yaml-cpp 0.7's LoadAll never returns on these.
  m = parse_error(",k");
  EXPECT_HAS(m, "p.yaml: the file is empty");
  m = parse_error(kHead + "layers: []\n---\n,\n");
  EXPECT_HAS(m, "p.yaml:5: document: the file holds more than one YAML document");
  m = parse_error("- a\n- b\n");
  EXPECT_HAS(m, "p.yaml:1: document: must be a map");
}

TEST(PlacementErrors, UnknownKeysAtEveryLevel) {
  std::string m = parse_error(kHead + "layers: []\nlayer: []\n");
  EXPECT_HAS(m, "p.yaml:4: document: unknown key `layer`");
  EXPECT_HAS(m, "valid keys here: ktune, model, runtime, layers, predicted, searched_on");
  m = parse_error("ktune: 1\nmodel: {path: m.gguf, quant: q4_0}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:2: model: unknown key `quant`");
  m = parse_error(kHead + "runtime:\n  cuda_graph: true\n  graphs: 2\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:5: runtime: unknown key `graphs`");
  m = parse_error(kHead + "layers:\n  - {layers: 0, attn: cpu}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0]: unknown key `attn`");
  m = parse_error(kHead + "layers: []\npredicted: {decode: 1}\n");
  EXPECT_HAS(m, "p.yaml:4: predicted: unknown key `decode`");
  m = parse_error(kHead + "layers: []\nsearched_on:\n  profile: a.json\n  host: x\n");
  EXPECT_HAS(m, "p.yaml:6: searched_on: unknown key `host`");
  m = parse_error(kHead + "layers: []\nmodel: {path: b.gguf}\n");
  EXPECT_HAS(m, "p.yaml:4: model: appears twice (first at line 2)");
  m = parse_error(kHead + "layers:\n  - {layers: 0, layers: 1}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].layers: appears twice");
  m = parse_error(kHead + "layers: []\n[1]: 2\n");
  EXPECT_HAS(m, "p.yaml:4: document: has a key that is a list");
}

TEST(PlacementErrors, WrongTypes) {
  std::string m = parse_error(kHead + "runtime: {context: \"4096\"}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:3: runtime.context: must be a whole number, not `4096` (quoted)");
  m = parse_error(kHead + "runtime: {context: 4k}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:3: runtime.context: `4k` is not a whole number");
  m = parse_error(kHead + "runtime: {context: 0}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:3: runtime.context: 0 is out of range");
  m = parse_error(kHead + "runtime: {batch: -2}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:3: runtime.batch: -2 is out of range");
  m = parse_error(kHead + "runtime: {cpu_threads: 99999999999999999999}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:3: runtime.cpu_threads: ");
  m = parse_error(kHead + "runtime: {cuda_graph: yes}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:3: runtime.cuda_graph: must be true or false");
  m = parse_error(kHead + "runtime: {moe_kernel: fast}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:3: runtime.moe_kernel: `fast` is not a MoE kernel; write fused or unfused");
  m = parse_error(kHead + "runtime: {cpu_handoff: [flags]}\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:3: runtime.cpu_handoff: a list is not a hand-off mechanism");
  m = parse_error(kHead + "runtime: 5\nlayers: []\n");
  EXPECT_HAS(m, "p.yaml:3: runtime: must be a map");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: all}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts: must be a map from device to experts");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts: is empty");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {cpu: {a: 1}}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts.cpu: must be expert ids");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {cpu: []}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts.cpu: is an empty list");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {cpu: [[1]]}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts.cpu: has an item that is a list");
  m = parse_error(kHead + "layers:\n  - 7\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0]: must be a map like");
  m = parse_error(kHead + "layers: []\npredicted: {decode_tok_s: -1}\n");
  EXPECT_HAS(m, "p.yaml:4: predicted.decode_tok_s: must be a number >= 0");
  m = parse_error(kHead + "layers: []\npredicted: {decode_tok_s: .inf}\n");
  EXPECT_HAS(m, "p.yaml:4: predicted.decode_tok_s: must be a number >= 0");
  m = parse_error(kHead + "layers: []\npredicted: {memory_gib: {gpu0: 1.0}}\n");
  EXPECT_HAS(m, "p.yaml:4: predicted.memory_gib: `gpu0` is not a device");
  m = parse_error(kHead + "layers: []\nsearched_on: {profile: [a]}\n");
  EXPECT_HAS(m, "p.yaml:4: searched_on.profile: must be a text value");
}

TEST(PlacementErrors, RangesAndCoverage) {
  std::string m = parse_error(kHead + "layers:\n  - {layers: \"0-48\"}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].layers: layer 48 is out of range");
  EXPECT_HAS(m, "valid layers: 0-47");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {cuda:0: [3, 128]}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts.cuda:0: expert 128 is out of range");
  m = parse_error(kHead + "layers:\n  - {layers: \"5-3\"}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].layers: range `5-3` runs backwards");
  m = parse_error(kHead + "layers:\n  - {layers: \"a-b\"}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].layers: `a-b` is not a range of layer ids");
  m = parse_error(kHead + "layers:\n  - {layers: -1}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].layers: `-1` is not a range of layer ids");
  m = parse_error(kHead + "layers:\n  - {layers: \"1,,2\"}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].layers: `1,,2` has an empty item");
  m = parse_error(kHead + "layers:\n  - {layers: [1, 1]}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].layers: layer 1 appears twice");
  m = parse_error(kHead +
                  "layers:\n  - {layers: \"0-9\"}\n  - {layers: 12}\n  - {layers: \"9-11\"}\n");
  EXPECT_HAS(m, "p.yaml:6: layers[2].layers: layer 9 is already placed by layers[0] at line 4");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {cuda:0: \"0-9\", cpu: \"9-12\"}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts.cpu: expert 9 is also given to cuda:0");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {cuda:0: rest, cpu: rest}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts.cpu: `rest` is already given to cuda:0");
  m = parse_error(kHead +
                  "layers:\n  - layers: 0\n    experts:\n      cpu: \"1\"\n      cuda:0: all\n");
  EXPECT_HAS(m, "p.yaml:7: layers[0].experts.cuda:0: `all` puts every expert on cuda:0");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {cpu: all, cpu: 1}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts.cpu: appears twice");
  // Without a model the file is still checked on its own, with generous limits.
  m = parse_error(kHead + "layers:\n  - {layers: \"0-99999\"}\n", nullptr);
  EXPECT_HAS(m, "p.yaml:4: layers[0].layers: layer 99999 is out of range");
}

TEST(PlacementErrors, Devices) {
  std::string m = parse_error(kHead + "layers:\n  - {layers: 0, attention: cuda}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].attention: `cuda` is not a device (did you mean cuda:0?)");
  EXPECT_HAS(m, "write cpu, cpu:N (NUMA node N) or cuda:N (GPU N)");
  m = parse_error(kHead + "layers:\n  - {layers: 0, attention: [cpu]}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].attention: a list is not a device");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {gpu:0: all}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts: `gpu:0` is not a device");
  m = parse_error(kHead + "layers:\n  - {layers: 0, experts: {cuda:01: all}}\n");
  EXPECT_HAS(m, "p.yaml:4: layers[0].experts: `cuda:01` is not a device");
}

TEST(PlacementErrors, YamlSyntax) {
  std::string m = parse_error(kHead + "layers: [\n");
  EXPECT_HAS(m, "p.yaml:");
  EXPECT_HAS(m, "not valid YAML");
  m = parse_error(kHead + "layers:\n  - {layers: 0\n  - {layers: 1}\n");
  EXPECT_HAS(m, "not valid YAML");
  m = parse_error(kHead + "layers: []\n  bad: indent\n");
  EXPECT_HAS(m, "p.yaml:4: not valid YAML");
  m = parse_error(kHead + "layers: *nowhere\n");
  EXPECT_HAS(m, "not valid YAML");
}

TEST(PlacementErrors, HostileDocumentsFailFast) {
  // Billion laughs: nine levels of nine aliases would be 9^9 nodes if expanded.
  std::string bomb =
      kHead + "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n";
  char prev = 'a';
  for (char c = 'b'; c <= 'j'; ++c) {
    bomb += std::string(1, c) + ": &" + c + " [";
    for (int i = 0; i < 9; ++i) bomb += std::string(i ? "," : "") + "*" + prev;
    bomb += "]\n";
    prev = c;
  }
  bomb += "layers: *j\n";
  auto t0 = std::chrono::steady_clock::now();
  std::string m = parse_error(bomb);
  EXPECT_HAS(m, "p.yaml:");
  EXPECT_HAS(m, "once aliases are expanded");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));

  for (const std::string& deep :
       {std::string(1000, '[') + std::string(1000, ']'), std::string(100000, '['), [] {
          std::string s;
          for (int i = 0; i < 1000; ++i) s += "{a: ";
          return s + "1" + std::string(1000, '}');
        }()}) {
    t0 = std::chrono::steady_clock::now();
    m = parse_error(kHead + "layers: " + deep + "\n");
    EXPECT_HAS(m, "p.yaml:3: document: nested deeper than 32 levels");
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));
  }
  // Block nesting, which no bracket counter sees: 1000 levels of indented maps.
  std::string block = kHead + "layers: []\nsearched_on:\n";
  for (int i = 1; i <= 1000; ++i) block += std::string(size_t(i), ' ') + "k:\n";
  t0 = std::chrono::steady_clock::now();
  m = parse_error(block);
  EXPECT_HAS(m, "p.yaml:");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));
  // Thousands of entries each naming every expert: capped without a model.
  std::string big = kHead + "layers:\n";
  for (int i = 0; i < 200; ++i) {
    big += "  - {layers: " + std::to_string(i) + ", experts: {cpu: \"0-65535\"}}\n";
  }
  m = parse_error(big, nullptr);
  EXPECT_HAS(m, "names more than");
}

// Mutations of a valid file (bytes deleted, replaced, inserted) either parse or throw a
// ktune::Error; nothing else escapes and nothing crashes.
TEST(PlacementErrors, MutatedFilesNeverCrash) {
  const std::string base = kDesignExample;
  std::mt19937 rng(1234);
  const std::string alphabet = "{}[]:,-\"'#&*!|>%@` \n\t0123456789abcz";
  int ok = 0, errors = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string s = base;
    const int edits = 1 + int(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % (s.size() + 1);
      const char c = alphabet[rng() % alphabet.size()];
      switch (rng() % 3) {
        case 0:
          if (pos < s.size()) s.erase(pos, 1);
          break;
        case 1:
          if (pos < s.size()) s[pos] = c;
          break;
        default:
          s.insert(pos, 1, c);
      }
    }
    try {
      const Placement p = ktune::parse_placement(s, "m.yaml", &qwen());
      EXPECT_EQ(p.n_layers(), 48);
      ++ok;
    } catch (const ktune::Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("m.yaml", 0), 0u) << e.what();
      ++errors;
    }
  }
  EXPECT_GT(ok, 0);
  EXPECT_GT(errors, 0);
}

// ------------------------------------------------------------------------ writer, round trips --

TEST(PlacementWrite, StandardForm) {
  const Placement p = ktune::parse_placement(kDesignExample, "p.yaml", &qwen());
  EXPECT_EQ(
      ktune::write_placement(p),
      "ktune: 1\n"
      "model: {path: model.gguf, arch: qwen3moe}\n"
      "runtime: {cuda_graph: true, moe_kernel: fused, cpu_handoff: flags, cpu_threads: 16, "
      "context: 4096, batch: 1}\n"
      "layers:\n"
      "  - {layers: \"0-23\", attention: cuda:0, experts: {cuda:0: all}}\n"
      "  - {layers: \"24-47\", attention: cuda:0, experts: {cuda:0: \"3,17,42\", cpu: rest}}\n"
      "predicted: {decode_tok_s: 0.0, prefill_tok_s: 0.0, memory_gib: {cuda:0: 0.0}}\n"
      "searched_on: {profile: profile.json, router_stats: sha256-of-the-stats}\n");
}

// runtime.pcie_assist: a share of the CPU experts (thousandths inside), `off`, strict errors;
// written back only when set, in the shortest decimal form.
TEST(PlacementParse, PcieAssist) {
  const std::string layers = "layers:\n  - {layers: \"0-47\", experts: {cpu: all}}\n";
  Placement p = ktune::parse_placement(kHead + "runtime: {pcie_assist: 0.375}\n" + layers, "p.yaml",
                                       &qwen());
  EXPECT_EQ(p.runtime.pcie_assist_permille, 375);
  const std::string w = ktune::write_placement(p);
  EXPECT_NE(w.find(", pcie_assist: 0.375}"), std::string::npos) << w;
  EXPECT_EQ(ktune::parse_placement(w, "q.yaml", &qwen()), p);
  p = ktune::parse_placement(kHead + "runtime: {pcie_assist: off}\n" + layers, "p.yaml", &qwen());
  EXPECT_EQ(p.runtime.pcie_assist_permille, 0);
  EXPECT_EQ(ktune::write_placement(p).find("pcie_assist"), std::string::npos);
  p = ktune::parse_placement(kHead + "runtime: {pcie_assist: 0.5}\n" + layers, "p.yaml", &qwen());
  EXPECT_EQ(p.runtime.pcie_assist_permille, 500);
  EXPECT_NE(ktune::write_placement(p).find("pcie_assist: 0.5}"), std::string::npos);
  for (const char* bad : {"1.5", "-0.1", "half", "[0.5]", "0.96"}) {
    const std::string m =
        parse_error(kHead + "runtime: {pcie_assist: " + bad + "}\n" + layers);
    EXPECT_HAS(m, "p.yaml:3: runtime.pcie_assist: ");
    EXPECT_HAS(m, "is not a share of the CPU experts; write a number from 0 to 0.95");
  }
  EXPECT_EQ(ktune::pcie_assist_text(375), "0.375");
  EXPECT_EQ(ktune::pcie_assist_text(250), "0.25");
  EXPECT_EQ(ktune::pcie_assist_text(950), "0.95");
  EXPECT_EQ(ktune::pcie_assist_text(0), "off");
  EXPECT_EQ(ktune::parse_pcie_assist("0.125", "x"), 125);
  EXPECT_THROW(ktune::parse_pcie_assist("", "x"), ktune::Error);
}

TEST(PlacementWrite, MergesRunsAndPicksRest) {
  Placement p = ktune::make_layer_split(tiny(), 2, Device::cuda(0));
  p.model_path = "synth:tiny";
  p.layers[3].experts[1] = Device::cuda(1);
  p.layers[3].experts[2] = Device::cuda(0);
  p.layers[3].experts[3] = Device::cuda(0);
  p.predicted = ktune::Predicted{};
  p.predicted->decode_tok_s = 123.456;
  p.predicted->memory_gib[Device::cuda(0)] = 0.1;
  p.predicted->memory_gib[Device::cpu()] = 1.0 / 3.0;
  const std::string text = ktune::write_placement(p);
  EXPECT_EQ(text,
            "ktune: 1\n"
            "model: {path: \"synth:tiny\", arch: qwen3moe}\n"
            "runtime: {cuda_graph: true, moe_kernel: fused, cpu_handoff: flags, cpu_threads: 0, "
            "context: 4096, batch: 1}\n"
            "layers:\n"
            "  - {layers: \"0-1\", attention: cuda:0, experts: {cuda:0: all}}\n"
            "  - {layers: \"2\", attention: cuda:0, experts: {cpu: all}}\n"
            "  - {layers: \"3\", attention: cuda:0, experts: {cuda:0: \"2-3\", cuda:1: \"1\", "
            "cpu: rest}}\n"
            "predicted: {decode_tok_s: 123.456, memory_gib: {cpu: 0.3333333333333333, "
            "cuda:0: 0.1}}\n")
      << text;
  EXPECT_EQ(ktune::parse_placement(text, "p.yaml", &tiny()), p);
}

// Random placements with a fixed seed: parse(write(p)) == p and writing is idempotent.
TEST(PlacementWrite, RandomRoundTrips) {
  std::mt19937_64 rng(20261127);
  const std::vector<Device> pool = {Device::cpu(),   Device{Device::Cpu, 0}, Device{Device::Cpu, 1},
                                    Device::cuda(0), Device::cuda(1),        Device::cuda(3),
                                    Device::cuda(10)};
  const std::vector<std::string> paths = {"m.gguf",
                                          "models/q 30b.gguf",
                                          "synth:qwen3-30b-a3b:q4_0",
                                          "/abs/model.gguf",
                                          "we\"ird\\name.gguf",
                                          "true",
                                          "123",
                                          "ünï.gguf",
                                          "a: b",
                                          "#x",
                                          "- x",
                                          "tab\there",
                                          "x:"};
  auto pick = [&](const std::vector<Device>& v) { return v[rng() % v.size()]; };
  for (int iter = 0; iter < 300; ++iter) {
    const ktune::ModelConfig& cfg = iter % 3 == 0 ? tiny() : qwen();
    Placement p = ktune::make_uniform_placement(cfg, Device::cpu(), Device::cpu());
    if (rng() % 2) p.arch.clear();
    p.model_path = paths[rng() % paths.size()];
    p.runtime.cuda_graph = rng() % 2;
    p.runtime.moe_kernel = rng() % 2 ? ktune::MoeKernel::Fused : ktune::MoeKernel::Unfused;
    p.runtime.cpu_handoff = rng() % 2 ? ktune::CpuHandoff::Flags : ktune::CpuHandoff::HostNode;
    p.runtime.cpu_threads = int(rng() % 65);
    p.runtime.context = 1 + int64_t(rng() % 100000);
    p.runtime.batch = 1 + int64_t(rng() % 16);
    int64_t l = 0;
    while (l < cfg.n_layers) {
      const int64_t run = 1 + int64_t(rng() % 8);
      ktune::LayerPlacement lp{pick(pool), std::vector<Device>(size_t(cfg.n_experts))};
      const int mode = int(rng() % 4);
      const Device a = pick(pool), b = pick(pool), c = pick(pool);
      for (auto& d : lp.experts) {
        if (mode == 0) d = a;                                       // all on one device
        if (mode == 1) d = rng() % 8 == 0 ? a : b;                  // a hot list plus rest
        if (mode == 2) d = rng() % 3 == 0 ? a : rng() % 2 ? b : c;  // three-way mix
        if (mode == 3) d = pick(pool);                              // anything
      }
      for (int64_t k = 0; k < run && l < cfg.n_layers; ++k, ++l) p.layers[size_t(l)] = lp;
    }
    if (rng() % 2) {
      p.predicted = ktune::Predicted{};
      if (rng() % 2) p.predicted->decode_tok_s = double(rng() % 100000) / double(1 + rng() % 1000);
      if (rng() % 2)
        p.predicted->prefill_tok_s = std::ldexp(double(rng() % 1000), -int(rng() % 60));
      for (int k = int(rng() % 3); k > 0; --k) {
        p.predicted->memory_gib[pick(pool)] = double(rng() % 1000000) / 7.0;
      }
    }
    if (rng() % 2) {
      p.searched_on = ktune::SearchedOn{};
      if (rng() % 2) p.searched_on->profile = paths[rng() % paths.size()];
      if (rng() % 2) p.searched_on->router_stats = "sha256:" + std::to_string(rng());
    }
    const std::string text = ktune::write_placement(p);
    Placement back;
    try {
      back = ktune::parse_placement(text, "r.yaml", &cfg);
    } catch (const ktune::Error& e) {
      FAIL() << e.what() << "\n" << text;
    }
    ASSERT_EQ(back, p) << text;
    ASSERT_EQ(ktune::write_placement(back), text);
  }
}

TEST(PlacementWrite, SaveAndLoad) {
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::temp_directory_path() / ("ktune_placement_" + std::to_string(::getpid()));
  fs::create_directories(dir / "configs");
  Placement p = ktune::make_layer_split(qwen(), 24, Device::cuda(0), /*from_end=*/true);
  p.model_path = "../model.gguf";
  const std::string path = (dir / "configs" / "best.yaml").string();
  ktune::save_placement(path, p);
  const Placement back = ktune::load_placement(path, &qwen());
  EXPECT_EQ(back, p);
  EXPECT_EQ(back.model_resolved, (dir / "model.gguf").string());
  EXPECT_EQ(back.file, path);
  try {
    ktune::load_placement((dir / "missing.yaml").string());
    ADD_FAILURE();
  } catch (const ktune::Error& e) {
    EXPECT_HAS(e.what(), "missing.yaml: cannot read the placement file");
  }
  fs::remove_all(dir);
}

TEST(PlacementHelpers, UniformAndSplits) {
  const Placement u = ktune::make_uniform_placement(qwen(), Device::cuda(0), Device::cpu());
  EXPECT_EQ(u.n_layers(), 48);
  EXPECT_EQ(u.n_experts(), 128);
  EXPECT_EQ(ktune::expert_counts(u), (std::map<Device, int64_t>{{Device::cpu(), 48 * 128}}));
  const Placement first = ktune::make_layer_split(qwen(), 12, Device::cuda(1));
  const Placement last = ktune::make_layer_split(qwen(), 12, Device::cuda(1), true);
  EXPECT_EQ(ktune::expert_counts(first, 11), (std::map<Device, int64_t>{{Device::cuda(1), 128}}));
  EXPECT_EQ(ktune::expert_counts(first, 12), (std::map<Device, int64_t>{{Device::cpu(), 128}}));
  EXPECT_EQ(ktune::expert_counts(last, 35), (std::map<Device, int64_t>{{Device::cpu(), 128}}));
  EXPECT_EQ(ktune::expert_counts(last, 36), (std::map<Device, int64_t>{{Device::cuda(1), 128}}));
  EXPECT_EQ(first.layers[40].attention, Device::cuda(1));
  EXPECT_TRUE(ktune::expert_counts(first, 48).empty());
  EXPECT_THROW(ktune::make_layer_split(qwen(), 49, Device::cuda(0)), ktune::Error);
  // A placement built for one shape does not resolve against another.
  Placement t = ktune::make_uniform_placement(tiny(), Device::cpu(), Device::cpu());
  EXPECT_THROW(ktune::resolve_placement(t, qwen()), ktune::Error);
}

TEST(PlacementExamples, EveryExampleParses) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(KTUNE_TEST_DATA) / ".." / ".." / "configs" / "examples";
  int n = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    Placement p;
    ASSERT_NO_THROW(p = ktune::load_placement(entry.path().string(), &qwen()));
    EXPECT_EQ(p.n_layers(), 48);
    // Re-writing gives the standard form, which parses back to the same placement.
    const std::string text = ktune::write_placement(p);
    EXPECT_EQ(ktune::parse_placement(text, entry.path().string(), &qwen()), p);
    ++n;
  }
  EXPECT_GE(n, 4);
}

}  // namespace
