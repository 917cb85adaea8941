// Hostile input at the command line (issue 8, item 2), as a user meets it: every input file kind
// (GGUF model, Hugging Face folder, placement YAML, profile.json) empty, truncated, corrupted or
// replaced by another kind of file; YAML alias bombs and deep nesting; JSON nesting bombs and
// profiles of another schema; every numeric option negative, zero where that is invalid, or
// absurd; unknown devices; bad memory budgets and plans that do not fit; a host that refuses
// memory or threads. Each case must end with exit 1 (2 for a command-line mistake), exactly one
// line on stderr of the form `ktune: error: <where>: <problem>; <what to do>`, and no signal;
// a guard kills a hang (KILL after kGuardSeconds), which then fails as a signal.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ktune/engine/gpu_info.h"
#include "profiler/profile_summary.h"
#include "subprocess.h"

namespace fs = std::filesystem;
using ktune::test::count_lines;
using ktune::test::ProcessResult;
using ktune::test::run_ktune;

namespace {

constexpr int kGuardSeconds = 60;

std::string profiles_dir() { return std::string(KTUNE_TEST_DATA) + "/../../profiles"; }

std::string join(const std::vector<std::string>& args) {
  std::string s = "ktune";
  for (const std::string& a : args) s += " " + (a.size() > 80 ? a.substr(0, 77) + "..." : a);
  return s;
}

// The contract. `needle` (may be empty) must appear in the message.
void expect_one_line_error(const ProcessResult& r, int code, const std::string& needle,
                           const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_FALSE(r.signaled) << (r.signal == SIGKILL ? "hung (killed by the guard)" : "signal ")
                           << r.signal << "\nstderr: " << r.err;
  EXPECT_EQ(r.exit_code, code) << r.err;
  EXPECT_EQ(count_lines(r.err), 1) << r.err;
  const std::string prefix = "ktune: error: ";
  ASSERT_EQ(r.err.rfind(prefix, 0), 0u) << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.back(), '\n');
  // <where>: <problem>; <what to do>, each part non-empty.
  const size_t colon = r.err.find(": ", prefix.size());
  ASSERT_NE(colon, std::string::npos) << r.err;
  EXPECT_GT(colon, prefix.size()) << "empty <where>: " << r.err;
  const size_t semi = r.err.find("; ", colon + 2);
  ASSERT_NE(semi, std::string::npos) << "no '; <what to do>': " << r.err;
  EXPECT_GT(semi, colon + 2) << "empty <problem>: " << r.err;
  EXPECT_GT(r.err.size(), semi + 3) << "empty <what to do>: " << r.err;
  for (char c : r.err.substr(0, r.err.size() - 1)) {
    EXPECT_FALSE(static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
        << "control character " << int(c) << " in: " << r.err;
  }
  if (!needle.empty()) {
    EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.err;
  }
}

ProcessResult expect_error(const std::vector<std::string>& args, int code,
                           const std::string& needle = "") {
  const ProcessResult r = run_ktune(args, kGuardSeconds);
  expect_one_line_error(r, code, needle, join(args));
  return r;
}

// run_ktune with an address-space limit (RLIMIT_AS) in the child: a host under memory pressure
// as the process sees it (allocations and thread stacks fail).
ProcessResult run_ktune_limited(const std::vector<std::string>& args, rlim_t address_space) {
  char out_tmpl[] = "/tmp/ktune_test_out_XXXXXX";
  char err_tmpl[] = "/tmp/ktune_test_err_XXXXXX";
  const int out_fd = mkstemp(out_tmpl);
  const int err_fd = mkstemp(err_tmpl);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out_fd, 1);
    dup2(err_fd, 2);
    alarm(kGuardSeconds);  // the guard: SIGALRM kills a hang
    const rlimit lim{address_space, address_space};
    setrlimit(RLIMIT_AS, &lim);
    std::vector<std::string> argv_s = {KTUNE_BINARY};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& s : argv_s) argv.push_back(s.data());
    argv.push_back(nullptr);
    execv(KTUNE_BINARY, argv.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  close(out_fd);
  close(err_fd);
  ProcessResult r;
  r.out = ktune::test::read_all(out_tmpl);
  r.err = ktune::test::read_all(err_tmpl);
  unlink(out_tmpl);
  unlink(err_tmpl);
  if (WIFEXITED(status)) {
    r.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.signaled = true;
    r.signal = WTERMSIG(status);
  }
  return r;
}

void put_u32(std::string& b, size_t at, uint32_t v) { std::memcpy(&b[at], &v, 4); }
void put_u64(std::string& b, size_t at, uint64_t v) { std::memcpy(&b[at], &v, 8); }

// No file and no temp file under the output name `out`.
void expect_no_output(const std::string& out) {
  EXPECT_FALSE(fs::exists(out)) << out;
  const std::string prefix = fs::path(out).filename().string() + ".tmp.";
  for (const auto& e : fs::directory_iterator(fs::path(out).parent_path())) {
    EXPECT_NE(e.path().filename().string().rfind(prefix, 0), 0u) << e.path();
  }
}

class Hostile : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("ktune_hostile_" + std::to_string(getpid()));
    fs::create_directories(dir_);
    gguf_ = path("good.gguf");
    const ProcessResult r = run_ktune(
        {"gen-model", "--preset", "tiny", "--quant", "q8_0", "--seed", "3", "-q", "-o", gguf_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    // A profile of a run (summary + timeline) as `ktune profile` writes it.
    profile_ = path("good.json");
    const ProcessResult p =
        run_ktune({"profile", "--model", "synth:tiny", "-p", "4", "-n", "4", "--warmup", "0",
                   "--baseline-windows", "1", "--threads", "1", "-q", "-o", profile_});
    ASSERT_EQ(p.exit_code, 0) << p.err;
    placement_ = write("good.yaml",
                       "ktune: 1\nmodel: {path: \"synth:tiny:q8_0\"}\nruntime: {cpu_threads: 1}\n"
                       "layers:\n  - {layers: \"0-3\", attention: cpu, experts: {cpu: all}}\n");
    hf_ = std::string(KTUNE_TEST_DATA) + "/qwen3moe-tiny-hf";
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  static std::string path(const std::string& name) { return (dir_ / name).string(); }
  static std::string write(const std::string& name, const std::string& bytes) {
    std::ofstream(path(name), std::ios::binary) << bytes;
    return path(name);
  }
  static std::string bytes(const std::string& p) { return ktune::test::read_all(p); }
  // A copy of the test checkpoint with `file` replaced by `content`.
  static std::string hf_with(const std::string& name, const std::string& file,
                             const std::string& content) {
    const fs::path d = dir_ / name;
    fs::create_directories(d);
    for (const char* f : {"config.json", "model.safetensors"}) {
      fs::copy_file(fs::path(hf_) / f, d / f, fs::copy_options::overwrite_existing);
    }
    std::ofstream(d / file, std::ios::binary) << content;
    return d.string();
  }
  static fs::path dir_;
  static std::string gguf_, profile_, placement_, hf_;
};
fs::path Hostile::dir_;
std::string Hostile::gguf_, Hostile::profile_, Hostile::placement_, Hostile::hf_;

// Every command that reads a model, for one bad model file or folder. Commands whose output
// would be a file must leave none. `whole_file`: also the commands that read a GGUF without
// building the model (tokenize reads the vocabulary, quantize streams tensors of any shape).
void expect_every_model_reader_refuses(const std::string& model, const std::string& needle,
                                       const std::string& out_dir, bool whole_file = true) {
  const std::string tag = fs::path(model).filename().string();
  const std::string q = out_dir + "/q-" + tag + ".gguf";
  const std::string p = out_dir + "/p-" + tag + ".json";
  const std::string best = out_dir + "/best-" + tag + ".yaml";
  expect_error({"info", "--model", model}, 1, needle);
  expect_error({"run", "--model", model, "-p", "1", "-n", "1", "-r", "1", "--no-probe"}, 1,
               needle);
  expect_error({"logits", "--model", model, "--tokens", "1"}, 1, needle);
  expect_error({"profile", "--model", model, "-n", "2", "-q", "-o", p}, 1, needle);
  expect_no_output(p);
  expect_error({"search", "--profile", profiles_dir() + "/h100-16core-handmade.json", "--model",
                model, "-o", best},
               1, needle);
  expect_no_output(best);
  if (!whole_file) return;
  expect_error({"tokenize", "--model", model, "hello"}, 1, needle);
  if (!fs::is_directory(model)) {
    expect_error({"quantize", model, q, "--type", "q4_0", "-q"}, 1, needle);
    expect_no_output(q);
  }
}

// ------------------------------------------------------------------------------ GGUF models --

TEST_F(Hostile, GgufEmptyTruncatedAtEveryStageAndOtherKindsOfFile) {
  const std::string good = bytes(gguf_);
  ASSERT_GT(good.size(), 100000u);
  std::vector<std::pair<std::string, std::string>> files = {
      {"empty.gguf", ""},
      {"magic-only.gguf", good.substr(0, 4)},
      {"header-cut.gguf", good.substr(0, 20)},
      {"metadata-cut.gguf", good.substr(0, 300)},
      {"tensor-info-cut.gguf", good.substr(0, 3000)},
      {"data-cut.gguf", good.substr(0, good.size() / 2)},
      {"last-byte-cut.gguf", good.substr(0, good.size() - 1)},
      {"yaml.gguf", bytes(placement_)},
      {"json.gguf", bytes(profile_)},
      {"safetensors.gguf", bytes(hf_ + "/model.safetensors")},
      {"text.gguf", "hello, this is not a model\n"},
  };
  for (const auto& [name, content] : files) {
    SCOPED_TRACE(name);
    expect_every_model_reader_refuses(write(name, content), name, dir_.string());
  }
}

TEST_F(Hostile, GgufCorruptedHeadersCountsTypesAndOffsets) {
  const std::string good = bytes(gguf_);
  // Header: magic u32, version u32, tensor count u64, kv count u64; then the first key's length.
  std::vector<std::pair<std::string, std::string>> files;
  auto variant = [&](const std::string& name, const auto& edit) {
    std::string b = good;
    edit(b);
    files.emplace_back(name, b);
  };
  variant("version.gguf", [](std::string& b) { put_u32(b, 4, 99); });
  variant("tensor-count.gguf", [](std::string& b) { put_u64(b, 8, uint64_t{1} << 60); });
  variant("kv-count.gguf", [](std::string& b) { put_u64(b, 16, uint64_t{1} << 60); });
  variant("key-length.gguf", [](std::string& b) { put_u64(b, 24, uint64_t{1} << 62); });
  variant("value-type.gguf", [](std::string& b) {
    uint64_t len;
    std::memcpy(&len, &b[24], 8);
    put_u32(b, 32 + len, 77);  // the first value's type
  });
  // Tensor info of one expert tensor: name, n_dims u32, dims u64 x n, type u32, offset u64.
  const std::string name = "blk.0.ffn_up_exps.weight";
  const size_t at = good.find(name);
  ASSERT_NE(at, std::string::npos);
  const size_t nd = at + name.size();
  uint32_t n_dims;
  std::memcpy(&n_dims, &good[nd], 4);
  const size_t type_at = nd + 4 + 8 * n_dims;
  variant("n-dims.gguf", [&](std::string& b) { put_u32(b, nd, 99); });
  variant("dim-huge.gguf", [&](std::string& b) { put_u64(b, nd + 4, uint64_t{1} << 62); });
  variant("type-unknown.gguf", [&](std::string& b) { put_u32(b, type_at, 9999); });
  variant("offset-beyond.gguf", [&](std::string& b) { put_u64(b, type_at + 4, uint64_t{1} << 50); });
  variant("offset-unaligned.gguf", [&](std::string& b) {
    uint64_t off;
    std::memcpy(&off, &b[type_at + 4], 8);
    put_u64(b, type_at + 4, off + 1);
  });
  for (const auto& [file, content] : files) {
    SCOPED_TRACE(file);
    expect_every_model_reader_refuses(write(file, content), file, dir_.string());
  }
  // A zero-sized tensor is valid GGUF (quantize copies it, tokenize never reads it), but no
  // model has one.
  std::string zero = good;
  put_u64(zero, nd + 4, 0);
  expect_every_model_reader_refuses(write("dim-zero.gguf", zero), "dim-zero.gguf", dir_.string(),
                                    false);
}

// ----------------------------------------------------------------- Hugging Face checkpoints --

TEST_F(Hostile, HfFolderWithBadConfigOrWeights) {
  const std::string cfg = bytes(hf_ + "/config.json");
  const std::string st = bytes(hf_ + "/model.safetensors");
  auto set_layers = [&](const std::string& v) {
    std::string c = cfg;
    const size_t k = c.find("\"num_hidden_layers\"");
    EXPECT_NE(k, std::string::npos);
    const size_t colon = c.find(':', k), end = c.find_first_of(",}", colon);
    c.replace(colon + 1, end - colon - 1, " " + v);
    return c;
  };
  std::string offsets = st;  // a tensor whose data ends before it begins
  const size_t o = offsets.find("\"data_offsets\":[0,");
  ASSERT_NE(o, std::string::npos);
  offsets.replace(o, 18, "\"data_offsets\":[9,");
  std::string header_len = st;
  put_u64(header_len, 0, uint64_t{1} << 40);
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      {"cfg-empty", "config.json", ""},
      {"cfg-truncated", "config.json", cfg.substr(0, cfg.size() / 2)},
      {"cfg-binary", "config.json", bytes(gguf_)},
      {"cfg-yaml", "config.json", bytes(placement_)},
      {"cfg-profile", "config.json", bytes(profile_)},
      {"cfg-nesting-bomb", "config.json",
       "{\"a\": " + std::string(100000, '[') + std::string(100000, ']') + "}"},
      {"cfg-wrong-type", "config.json", set_layers("\"many\"")},
      {"cfg-negative-layers", "config.json", set_layers("-3")},
      {"cfg-4e9-layers", "config.json", set_layers("4000000000")},
      {"cfg-2e63-layers", "config.json", set_layers("9223372036854775807")},
      {"st-empty", "model.safetensors", ""},
      {"st-header-cut", "model.safetensors", st.substr(0, 20)},
      {"st-data-cut", "model.safetensors", st.substr(0, st.size() / 2)},
      {"st-gguf", "model.safetensors", bytes(gguf_)},
      {"st-offsets", "model.safetensors", offsets},
      {"st-header-length", "model.safetensors", header_len},
  };
  for (const auto& [name, file, content] : cases) {
    SCOPED_TRACE(name);
    const std::string d = hf_with(name, file, content);
    expect_every_model_reader_refuses(d, name, dir_.string());
    const std::string out = path(name + ".gguf");
    expect_error({"convert", d, "-o", out, "-q"}, 1, name);
    expect_no_output(out);
  }
}

TEST_F(Hostile, HfShardIndexThatIsBrokenOrPointsOutside) {
  for (const auto& [name, index] : std::vector<std::pair<std::string, std::string>>{
           {"idx-truncated", "{\"weight_map\": "},
           {"idx-outside", "{\"weight_map\": {\"lm_head.weight\": \"../../etc/passwd\"}}"},
           {"idx-missing", "{\"weight_map\": {\"lm_head.weight\": \"model-2.safetensors\"}}"},
           {"idx-wrong-type", "{\"weight_map\": [1, 2]}"}}) {
    SCOPED_TRACE(name);
    const std::string d = hf_with(name, "model.safetensors.index.json", index);
    expect_error({"info", "--model", d}, 1, "model.safetensors.index.json");
    expect_error({"convert", d, "-o", path(name + ".gguf"), "-q"}, 1,
                 "model.safetensors.index.json");
    expect_no_output(path(name + ".gguf"));
  }
}

// --------------------------------------------------------------------------- placement YAML --

std::string alias_bomb(const std::string& head) {
  std::string b = head + "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n";
  char prev = 'a';
  for (char c = 'b'; c <= 'j'; ++c) {
    b += std::string(1, c) + ": &" + c + " [";
    for (int i = 0; i < 9; ++i) b += std::string(i ? "," : "") + "*" + prev;
    b += "]\n";
    prev = c;
  }
  return b + "layers: *j\n";
}

// Every command that reads a placement.
void expect_every_placement_reader_refuses(const std::string& yaml, int code,
                                           const std::string& needle, const std::string& dir) {
  expect_error({"run", "--config", yaml, "-p", "0", "-n", "1", "-r", "1", "--no-probe"}, code,
               needle);
  expect_error({"profile", "--config", yaml, "-n", "2", "-q", "-o", dir + "/p.json"}, code,
               needle);
  EXPECT_FALSE(fs::exists(dir + "/p.json"));
  expect_error({"search", "--profile", profiles_dir() + "/h100-16core-handmade.json",
                "--model", "synth:tiny", "--workload", "prompt=64,gen=16", "--predict", yaml},
               code, needle);
}

TEST_F(Hostile, PlacementEmptyTruncatedBinaryBombsAndWrongValues) {
  const std::string head = "ktune: 1\nmodel: {path: \"synth:tiny\"}\n";
  const std::string good = bytes(placement_);
  std::string block = head + "layers: []\nsearched_on:\n";
  for (int i = 1; i <= 3000; ++i) block += std::string(size_t(i), ' ') + "k:\n";
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      {"empty.yaml", "", "empty"},
      {"truncated.yaml", good.substr(0, good.size() - 30), ""},
      {"gguf.yaml", bytes(gguf_), "binary"},
      {"profile.yaml", bytes(profile_), "ktune_profile"},
      {"alias-bomb.yaml", alias_bomb(head), "aliases"},
      {"flow-nesting.yaml", head + "layers: " + std::string(100000, '[') + "\n", "nested deeper"},
      {"block-nesting.yaml", block, ""},
      {"version-string.yaml", "ktune: \"one\"\nmodel: {path: x}\nlayers: []\n", "ktune"},
      {"version-2.yaml", "ktune: 2\nmodel: {path: x}\nlayers: []\n", "newer"},
      {"layers-map.yaml", head + "layers: {a: 1}\n", "layers"},
      {"threads-text.yaml", head + "runtime: {cpu_threads: many}\nlayers: []\n", "cpu_threads"},
      {"threads-negative.yaml", head + "runtime: {cpu_threads: -4}\nlayers: []\n", "cpu_threads"},
      {"threads-absurd.yaml", head + "runtime: {cpu_threads: 100000000}\nlayers: []\n",
       "cpu_threads"},
      {"context-negative.yaml", head + "runtime: {context: -1}\nlayers: []\n", "context"},
      {"context-absurd.yaml", head + "runtime: {context: 99999999999999}\nlayers: []\n",
       "context"},
      {"device-unknown.yaml",
       head + "layers:\n  - {layers: \"0-3\", attention: tpu:0, experts: {cpu: all}}\n", "tpu:0"},
      {"layer-range-absurd.yaml", head + "layers:\n  - {layers: \"0-99999999999\", attention: cpu}\n",
       "layers"},
      {"layer-beyond-model.yaml", head + "layers:\n  - {layers: \"0-50\", attention: cpu}\n", ""},
      {"expert-beyond-model.yaml",
       head + "layers:\n  - {layers: \"0-3\", attention: cpu, experts: {cpu: [0, 99999]}}\n", ""},
      {"two-documents.yaml", good + "---\n" + good, "document"},
  };
  for (const auto& [name, content, needle] : cases) {
    SCOPED_TRACE(name);
    expect_every_placement_reader_refuses(write(name, content), 1, needle, dir_.string());
  }
  // A folder and a missing file.
  expect_every_placement_reader_refuses(dir_.string(), 1, "", dir_.string());
  expect_every_placement_reader_refuses(path("missing.yaml"), 1, "missing.yaml", dir_.string());
}

TEST_F(Hostile, PlacementOnDevicesThisMachineLacksOrThatDoesNotFit) {
  if (!ktune::query_gpus().devices.empty()) GTEST_SKIP() << "this machine has a GPU";
  const std::string head = "ktune: 1\nmodel: {path: \"synth:tiny\"}\n";
  const std::string gpu7 = write(
      "cuda7.yaml", head + "layers:\n  - {layers: \"0-3\", attention: cpu, experts: {cuda:7: all}}\n");
  expect_error({"run", "--config", gpu7, "-p", "0", "-n", "1"}, 1, "cuda:7");
  expect_error({"profile", "--config", gpu7, "-n", "2", "-q", "-o", path("p.json")}, 1, "cuda:7");
  const std::string numa = write(
      "numa9.yaml",
      head + "layers:\n  - {layers: \"0-3\", attention: cpu:9, experts: {cpu:9: all}}\n");
  expect_error({"run", "--config", numa, "-p", "0", "-n", "1"}, 1, "cpu:9");
  // A plan over its host budget is refused before anything is loaded.
  expect_error({"run", "--config", placement_, "--cpu-mem", "1MiB", "-p", "0", "-n", "1"}, 1,
               "budget");
  expect_error({"run", "--model", "synth:qwen3-235b-a22b:q4_0", "--cpu-mem", "8GiB", "-p", "0",
                "-n", "1"},
               1, "budget is 8.0 GiB");
  expect_error({"profile", "--model", "synth:qwen3-235b-a22b:q4_0", "--cpu-mem", "8GiB", "-n", "2",
                "-q", "-o", path("p.json")},
               1, "budget is 8.0 GiB");
  EXPECT_FALSE(fs::exists(path("p.json")));
}

// ------------------------------------------------------------------------------ profile.json --

// Every command that reads a profile. `summary`: search, the one reader of the summary (trace
// reads the timeline, compare the windows, and each leaves fields it does not read alone).
void expect_every_profile_reader_refuses(const std::string& p, const std::string& needle,
                                         const std::string& good, const std::string& dir,
                                         bool summary_only = false) {
  const std::string tag = fs::path(p).filename().string();
  const std::string t = dir + "/t-" + tag, best = dir + "/best-" + tag + ".yaml";
  expect_error({"search", "--profile", p, "--model", "synth:tiny", "--workload",
                "prompt=64,gen=16", "-o", best},
               1, needle);
  expect_no_output(best);
  if (summary_only) return;
  expect_error({"trace", p, "-o", t}, 1, needle);
  expect_no_output(t);
  expect_error({"compare", p, good}, 1, needle);
  expect_error({"compare", good, p}, 1, needle);
}

TEST_F(Hostile, ProfileEmptyTruncatedOtherKindsBombsAndOtherSchemas) {
  const std::string text = bytes(profile_);
  const nlohmann::json doc = nlohmann::json::parse(text);
  auto with = [&](const char* key, const nlohmann::json& v) {
    nlohmann::json d = doc;
    d[key] = v;
    return d.dump();
  };
  nlohmann::json no_version = doc;
  no_version.erase("ktune_profile");
  nlohmann::json wrong_type = doc;
  wrong_type["summary"]["cpu"] = "fast";
  nlohmann::json negative = doc;
  negative["summary"]["cpu"]["physical_cores"] = -8;
  const std::string timeline = bytes(fs::path(profile_).replace_extension("").string() +
                                     ".timeline.json");
  ASSERT_FALSE(timeline.empty());
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      {"empty.json", "", "empty.json"},
      {"truncated.json", text.substr(0, text.size() / 2), "not valid JSON"},
      {"gguf.json", bytes(gguf_), "binary"},
      {"yaml.json", bytes(placement_), "not valid JSON"},
      {"array.json", "[1, 2, 3]", "not a ktune profile"},
      {"timeline.json", timeline, "not a ktune profile"},
      {"config.json", bytes(hf_ + "/config.json"), "not a ktune profile"},
      {"nesting-bomb.json",
       "{\"ktune_profile\": 2, \"x\": " + std::string(100000, '[') + std::string(100000, ']') +
           "}",
       "nested deeper"},
      {"open-bomb.json", std::string(1000000, '['), "nested deeper"},
      {"schema-99.json", with("ktune_profile", 99), "newer"},
      {"schema-0.json", with("ktune_profile", 0), "ktune_profile"},
      {"schema-negative.json", with("ktune_profile", -1), "ktune_profile"},
      {"schema-text.json", with("ktune_profile", "two"), "ktune_profile"},
      {"schema-fraction.json", with("ktune_profile", 1.5), "ktune_profile"},
      {"schema-huge.json", with("ktune_profile", 1e300), "ktune_profile"},
      {"no-schema.json", no_version.dump(), "not a ktune profile"},
      {"summary-wrong-type.json", wrong_type.dump(), "summary.cpu"},
      {"summary-negative.json", negative.dump(), "physical_cores"},
      {"number-overflow.json", "{\"ktune_profile\": 2, \"x\": 1e999}", "not valid JSON"},
  };
  for (const auto& [name, content, needle] : cases) {
    SCOPED_TRACE(name);
    const bool summary_only = name.rfind("summary-", 0) == 0;
    expect_every_profile_reader_refuses(write(name, content), needle, profile_, dir_.string(),
                                        summary_only);
  }
  // The timeline file a profile names: a bare name beside it, of depth-checked JSON.
  nlohmann::json escape = doc;
  escape["timeline_file"] = "../../etc/passwd";
  expect_error({"trace", write("escape.json", escape.dump()), "-o", path("t-escape.json")}, 1,
               "timeline_file");
  nlohmann::json bomb = doc;
  bomb["timeline_file"] = "bomb.timeline.json";
  write("bomb.timeline.json", std::string(100000, '['));
  expect_error({"trace", write("bomb.json", bomb.dump()), "-o", path("t-bomb.json")}, 1,
               "nested deeper");
  bomb["timeline_file"] = "gguf.timeline.json";
  write("gguf.timeline.json", bytes(gguf_));
  expect_error({"trace", write("gguf-tl.json", bomb.dump()), "-o", path("t-gguf.json")}, 1,
               "gguf.timeline.json");
  expect_no_output(path("t-escape.json"));
  expect_no_output(path("t-bomb.json"));
  expect_no_output(path("t-gguf.json"));
  expect_every_profile_reader_refuses(path("missing.json"), "missing.json", profile_,
                                      dir_.string());
  expect_every_profile_reader_refuses(dir_.string(), "", profile_, dir_.string());
}

// ---------------------------------------------------------------------- numeric options -----

TEST_F(Hostile, EveryNumericOptionNegativeZeroOrAbsurd) {
  const std::vector<std::string> run = {"run", "--model", "synth:tiny", "--no-probe"};
  auto with = [](std::vector<std::string> base, std::vector<std::string> extra) {
    base.insert(base.end(), extra.begin(), extra.end());
    return base;
  };
  const std::string big = "99999999999999999999";  // beyond 64 bits
  for (const std::string v : {"-1", "0", "100000000", "abc", "1e9", big.c_str()}) {
    expect_error(with(run, {"-p", "1", "-n", "1", "--threads", v}), 2, "--threads");
    expect_error({"logits", "--model", "synth:tiny", "--tokens", "1", "--threads", v}, 2,
                 "--threads");
    expect_error({"quantize", gguf_, path("q.gguf"), "--type", "q4_0", "--threads", v}, 2,
                 "--threads");
    expect_error({"probe", "--threads", v}, 2, "--threads");
    expect_error({"profile", "--model", "synth:tiny", "-n", "2", "-q", "-o", path("p.json"),
                  "--threads", v},
                 2, "--threads");
  }
  expect_no_output(path("q.gguf"));
  for (const std::string v : {"-1", "0", "1000000000", big.c_str()}) {
    expect_error(with(run, {"-p", "1", "-n", "1", "-r", v}), 2, "-r");
    expect_error({"probe", "--threads", "1", "-r", v}, 2, "-r");
  }
  for (const std::string v : {"-1", "0", "33", "1000000000"}) {
    expect_error(with(run, {"-p", "1", "-n", "1", "--batch", v}), 2, "--batch");
    expect_error({"profile", "--model", "synth:tiny", "-n", "2", "-q", "-o", path("p.json"),
                  "--batch", v},
                 2, "--batch");
  }
  expect_error(with(run, {"-p", "-1", "-n", "1"}), 2, "--prompt");
  expect_error(with(run, {"-p", "4", "-n", "-5"}), 2, "-n");
  expect_error(with(run, {"-p", "1000000000", "-n", "1"}), 2, "context");
  expect_error(with(run, {"-p", "0", "-n", "1000000000"}), 2, "context");
  expect_error(with(run, {"-p", "0", "-n", "0"}), 2, "-p/-n");
  for (const std::string v : {"-1", "5", "1000000000"}) {
    expect_error(with(run, {"--experts-on-gpu", v}), 2, "--experts-on-gpu");
  }
  for (const std::string v : {"-1", "0"}) expect_error(with(run, {"--gpus", v}), 2, "--gpus");
  // profile
  const std::vector<std::string> prof = {"profile", "--model", "synth:tiny", "-q", "-o",
                                         path("p.json")};
  expect_error(with(prof, {"-n", "-1"}), 2, "-n");
  expect_error(with(prof, {"-n", "0"}), 2, "-n");
  expect_error(with(prof, {"-n", "100000000"}), 2, "context");
  expect_error(with(prof, {"-n", "2", "-p", "-1"}), 2, "-p");
  expect_error(with(prof, {"-n", "2", "--warmup", "-1"}), 2, "--warmup");
  expect_error(with(prof, {"-n", "2", "--warmup", "100000000"}), 2, "context");
  for (const std::string v : {"-1", "0", "101", "100000000"}) {
    expect_error(with(prof, {"-n", "2", "--baseline-windows", v}), 2, "--baseline-windows");
  }
  for (const std::string v : {"-5s", "abc", "1e99s"}) {
    expect_error({"profile", "--exec", "--duration", v, "-o", path("p.json"), "--", "true"}, 2,
                 "--duration");
  }
  EXPECT_FALSE(fs::exists(path("p.json")));
  // probe
  for (const std::string v : {"-1", "0", "0.0001", "1e12", "nan"}) {
    expect_error({"probe", "--threads", "1", "--size-mib", v}, 2, "--size-mib");
  }
  // logits
  expect_error({"logits", "--model", "synth:tiny", "--tokens", "-1"}, 2, "--tokens");
  expect_error({"logits", "--model", "synth:tiny", "--tokens", "1", "--then", "99999"}, 2,
               "--then");
  // search
  const std::vector<std::string> search = {
      "search", "--profile", profiles_dir() + "/h100-16core-handmade.json",
      "--model", "synth:tiny", "--workload", "prompt=64,gen=16"};
  for (const std::string v : {"-1", "0", "1000000000"}) {
    expect_error(with(search, {"--top", v}), 2, "--top");
  }
  for (const std::string v : {"-1", "1000000000"}) {
    expect_error(with(search, {"--verify", v}), 2, "--verify");
  }
  for (const std::string v : {"-1", "0", "1000000000"}) {
    expect_error(with(search, {"--verify", "1", "-r", v}), 2, "-r");
  }
  const std::vector<std::string> search_nw(search.begin(), search.end() - 2);
  for (const std::string w :
       {"prompt=-5,gen=1", "prompt=0,gen=0", "prompt=64,gen=16,weight=-1",
        "prompt=64,gen=16,weight=nan", "prompt=99999999999999999999,gen=1",
        "prompt=64,gen=16,batch=100000000", "prompt=64,gen=16,context=-1", "prompt=64"}) {
    expect_error(with(search_nw, {"--workload", w}), 2, "--workload");
  }
  for (const std::string a : {"launch_eager_us=-5", "launch_eager_us=nan", "launch_eager_us=0",
                               "launch_eager_us=1e999"}) {
    expect_error(with(search, {"--assume", a}), 2, "launch_eager_us");
  }
  // gen-model
  for (const std::string v : {"-1", "18446744073709551616", "99999999999999999999999", "1e3", "1.5",
                              "abc"}) {
    expect_error({"gen-model", "--preset", "tiny", "--seed", v, "-q", "-o", path("g.gguf")}, 2,
                 "--seed");
  }
  for (const std::string s : {"zipf:-1", "zipf:nan", "zipf:1e308", "zipf:", "pareto:1"}) {
    expect_error({"gen-model", "--preset", "tiny", "--router-skew", s, "-q", "-o", path("g.gguf")},
                 2, "--router-skew");
  }
  expect_no_output(path("g.gguf"));
}

TEST_F(Hostile, MemoryBudgetsNegativeZeroAbsurdOrOnUnknownDevices) {
  for (const char* flag : {"--cpu-mem", "--gpu-mem"}) {
    for (const std::string v : {"-1GiB", "0", "lots", "1e300GiB", "99999999TiB", "5XiB", "GiB",
                                 "nan GiB"}) {
      expect_error({"run", "--model", "synth:tiny", "-p", "0", "-n", "1", flag, v}, 2, flag);
      expect_error({"profile", "--model", "synth:tiny", "-n", "2", "-q", "-o", path("p.json"),
                    flag, v},
                   2, flag);
      expect_error({"search", "--profile", profiles_dir() + "/h100-16core-handmade.json",
                    "--model", "synth:tiny", "--workload", "prompt=64,gen=16", flag, v},
                   2, flag);
    }
  }
  for (const std::string v : {"nvme:0=5GiB", "cuda:-1=5GiB", "cuda:x=5GiB", "cpu:-2=5GiB",
                               "cuda:0=5GiB,cuda:0=6GiB=7GiB"}) {
    expect_error({"run", "--model", "synth:tiny", "-p", "0", "-n", "1", "--gpu-mem", v}, 2,
                 "--gpu-mem");
  }
  // Budgets that parse but leave nothing: a plan that does not fit (exit 1).
  expect_error({"run", "--model", "synth:tiny", "-p", "0", "-n", "1", "--cpu-mem", "0GiB"}, 1,
               "budget");
  expect_error({"search", "--profile", profiles_dir() + "/h100-16core-handmade.json",
                "--model", "synth:qwen3-30b-a3b:q4_0", "--gpu-mem", "1GiB", "--cpu-mem", "1GiB"},
               1, "no placement fits");
  EXPECT_FALSE(fs::exists(path("p.json")));
}

TEST_F(Hostile, UnknownNamesAreUsageErrorsThatListTheChoices) {
  expect_error({"run", "--model", "synth:nope"}, 2, "nope");
  expect_error({"run", "--model", "synth:tiny:q9"}, 2, "q9");
  expect_error({"run", "--model", "synth:tiny", "--cuda-graph", "maybe"}, 2, "--cuda-graph");
  expect_error({"run", "--model", "synth:tiny", "--moe-kernel", "fast"}, 2, "--moe-kernel");
  expect_error({"run", "--model", "synth:tiny", "--cpu-handoff", "pigeon"}, 2, "--cpu-handoff");
  expect_error({"run", "--model", "synth:tiny", "--gpu-transport", "smoke"}, 2, "--gpu-transport");
  expect_error({"run", "--model", "synth:tiny", "--pcie-assist", "1.5"}, 2, "--pcie-assist");
  expect_error({"profile", "--model", "synth:tiny", "--pcie-assist", "lots", "-o", path("p.json")},
               2, "--pcie-assist");
  expect_error({"gen-model", "--preset", "llama-7b", "-o", path("g.gguf")}, 2, "llama-7b");
  expect_error({"quantize", gguf_, path("q.gguf"), "--type", "q9_9"}, 2, "q9_9");
  expect_error({"quantize", gguf_, path("q.gguf"), "--mixed", "q1_k_xxl"}, 2, "q1_k_xxl");
  expect_error({"search", "--profile", "no-such-profile-name", "--model", "synth:tiny"}, 1,
               "no-such-profile-name");
  expect_error({"search", "--profile", profiles_dir() + "/h100-16core-handmade.json",
                "--model", "synth:tiny", "--emit", "vllm", "-o", path("x")},
               2, "--emit");
  expect_error({"bogus-command"}, 2, "bogus-command");
  expect_error({"run", "--no-such-flag"}, 2, "--no-such-flag");
  expect_no_output(path("g.gguf"));
  expect_no_output(path("q.gguf"));
}

TEST_F(Hostile, OutputPathsThatCannotBeWritten) {
  for (const std::string& out :
       std::vector<std::string>{path("no-folder/x.out"), dir_.string(), "/proc/x"}) {
    expect_error({"gen-model", "--preset", "tiny", "-q", "-o", out}, 1, "");
    expect_error({"trace", profile_, "-o", out}, 1, "");
    expect_error({"profile", "--model", "synth:tiny", "-n", "2", "-q", "-o", out}, 1, "");
    // Refused before the run: nothing beside it either (a folder as -o left
    // "<folder>.timeline.json" behind).
    EXPECT_FALSE(fs::exists(out + ".timeline.json")) << out;
    if (out.find("no-folder") == std::string::npos) {  // search makes -o's folder
      expect_error({"search", "--profile", profiles_dir() + "/h100-16core-handmade.json",
                    "--model", "synth:tiny", "--workload", "prompt=64,gen=16", "-o", out},
                   1, "");
    }
    expect_error({"quantize", gguf_, out, "--type", "q4_0", "-q"}, 1, "");
  }
  // The output would replace the input.
  expect_error({"quantize", gguf_, gguf_, "--type", "q4_0"}, 2, "replace");
}

// A machine without a GPU (CI): every request for one is one line naming the device and why.
TEST_F(Hostile, NoGpuHereIsOneLineForEveryGpuRequest) {
  if (!ktune::query_gpus().devices.empty()) GTEST_SKIP() << "this machine has a GPU";
  expect_error({"run", "--model", "synth:tiny", "--experts-on-gpu", "4", "-p", "0", "-n", "1"}, 1,
               "cuda:0");
  expect_error({"run", "--model", "synth:tiny", "--gpus", "2", "-p", "0", "-n", "1"}, 1, "cuda:");
  expect_error({"profile", "--model", "synth:tiny", "--experts-on-gpu", "4", "-n", "2", "-q", "-o",
                path("p.json")},
               1, "cuda:0");
  expect_error({"profile", "--exec", "-o", path("p.json"), "--", "true"}, 1, "profile --exec");
  // (a prompt long enough for the GPU to win: tiny's 64-token prefill is launch-bound there, and
  // the CPU engine, which --verify runs anywhere, would be chosen)
  expect_error({"search", "--profile", profiles_dir() + "/h100-16core-handmade.json",
                "--model", "synth:tiny", "--workload", "prompt=512,gen=16", "--verify", "1", "-o",
                path("best.yaml")},
               1, "cuda:0");
  EXPECT_FALSE(fs::exists(path("p.json")));
  EXPECT_FALSE(fs::exists(path("best.yaml")));
}

// --------------------------------------------------------------------- host memory pressure --

TEST_F(Hostile, ModelLargerThanTheAddressSpaceIsOneLineNotACrash) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "RLIMIT_AS cannot be combined with AddressSanitizer's shadow memory";
#endif
  // 2 GiB of address space; the 30B model needs 16 GiB (the planner is told there is room).
  const ProcessResult r = run_ktune_limited(
      {"run", "--model", "synth:qwen3-30b-a3b:q4_0", "--cpu-mem", "500GiB", "-p", "1", "-n", "1",
       "-r", "1", "--no-probe", "--threads", "1"},
      rlim_t{2} << 30);
  expect_one_line_error(r, 1, "cannot allocate", "30B model under RLIMIT_AS 2 GiB");
  const ProcessResult g = run_ktune_limited({"info", "--model", gguf_}, rlim_t{2} << 30);
  EXPECT_EQ(g.exit_code, 0) << g.err;  // the limit itself leaves room for a small model
}

TEST_F(Hostile, ThreadsTheSystemRefusesAreOneLineNotATerminate) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "RLIMIT_AS cannot be combined with AddressSanitizer's shadow memory";
#endif
  // 4096 threads (the largest count the flags accept) need 32 GiB of stacks; 2 GiB of address
  // space runs out after a few hundred.
  const rlim_t limit = rlim_t{2} << 30;
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"run", "--model", "synth:tiny", "-p", "1", "-n", "1", "-r", "1", "--no-probe",
            "--threads", "4096"},
           {"logits", "--model", "synth:tiny", "--tokens", "1", "--threads", "4096"},
           {"quantize", gguf_, path("q.gguf"), "--type", "q4_0", "-q", "--threads", "4096"},
           {"probe", "--threads", "4096", "--size-mib", "64", "-r", "1"}}) {
    const ProcessResult r = run_ktune_limited(args, limit);
    expect_one_line_error(r, 1, "thread", join(args) + " under RLIMIT_AS 2 GiB");
  }
  expect_no_output(path("q.gguf"));
}

}  // namespace
