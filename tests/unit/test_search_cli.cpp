// `ktune search` as a user runs it: the committed example profile on the 235B shape (the CI
// check of issue 6 item 5, with the wall time printed), the files beside -o and the planner's
// verdict on them, --json, the exports read back, --verify on this machine's CPU engine, and
// one-line errors with exit codes for bad profile, model, workload and budget inputs.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "ktune/engine/memory_plan.h"
#include "ktune/engine/placement.h"
#include "search/emit.h"
#include "subprocess.h"
#include "test_search_util.h"

namespace fs = std::filesystem;
using ktune::test::count_lines;
using ktune::test::ProcessResult;
using ktune::test::read_all;
using ktune::test::run_ktune;

namespace ktune::search {
namespace {

const std::string kProfile = test::profiles_dir() + "/h100-16core-handmade.json";

class SearchCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ktune_search_cli_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(path(name), std::ios::binary) << text;
    return path(name);
  }
  std::string write_profile(const std::string& name, const profile::ProfileSummary& s) const {
    nlohmann::json j;
    j["ktune_profile"] = 1;
    profile::to_json(j["summary"], s);
    return write(name, j.dump());
  }
  static void expect_one_line_error(const ProcessResult& r, int code, const std::string& needle) {
    EXPECT_FALSE(r.signaled) << r.err;
    EXPECT_EQ(r.exit_code, code) << r.err;
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
    EXPECT_EQ(r.err.rfind("ktune: error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find("; "), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in " << r.err;
  }
  // The budgets `ktune search` derives from the profile's machine.
  static Budgets profile_budgets(const std::string& profile_path) {
    const profile::ProfileSummary s = profile::read_profile_summary(profile_path);
    Budgets b;
    for (const auto& g : s.gpus) b.bytes[g.device] = g.mem_bytes - kGpuBudgetHeadroom;
    b.bytes["cpu"] = s.cpu.mem_available_bytes - kHostBudgetHeadroom;
    return b;
  }

  fs::path dir_;
};

TEST_F(SearchCli, CommittedExampleProfileOnTheBigShape) {
  ASSERT_TRUE(fs::exists(kProfile)) << kProfile;
  const auto t0 = std::chrono::steady_clock::now();
  const ProcessResult r =
      run_ktune({"search", "--profile", kProfile, "--model", "synth:qwen3-235b-a22b:q4_0"});
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ ktune search ] --profile %s --model synth:qwen3-235b-a22b:q4_0: %.2f s wall\n",
              fs::path(kProfile).filename().c_str(), s);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
  EXPECT_NE(r.out.find("| rank |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("# best (graph on): rank"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("# best (graph off): rank"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("baseline: llama.cpp --fit"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("# whole layers"), std::string::npos) << r.out;
}

TEST_F(SearchCli, WritesBestAndNographBesideTheOutputAndThePlannerAcceptsThem) {
  const std::string out = path("plans/best.yaml");
  const ProcessResult r = run_ktune({"search", "--profile", kProfile, "--model",
                                     "synth:qwen3-30b-a3b:q4_0", "--gpu-mem", "cuda:0=12GiB",
                                     "--workload", "prompt=2048,gen=256,context=8192", "-o", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const ModelConfig cfg = *find_preset("qwen3-30b-a3b");
  Budgets b = profile_budgets(kProfile);
  b.bytes["cuda:0"] = int64_t{12} << 30;
  std::vector<std::string> files = {out, path("plans/best-nograph.yaml")};
  for (const auto& e : fs::directory_iterator(path("plans/best.candidates"))) {
    files.push_back(e.path().string());
  }
  EXPECT_GE(files.size(), 5u);
  for (const std::string& f : files) {
    const Placement p = load_placement(f, &cfg);
    EXPECT_EQ(p.runtime.context, 8192) << f;
    ASSERT_TRUE(p.predicted.has_value()) << f;
    EXPECT_GT(*p.predicted->decode_tok_s, 0) << f;
    EXPECT_TRUE(p.predicted->memory_gib.count(Device::cuda(0)) || !p.runtime.cuda_graph) << f;
    EXPECT_NO_THROW(check_fits(plan_memory(cfg, QuantType::Q4_0, QuantType::Q4_0, p, b))) << f;
    // The table shows the command that runs it.
    EXPECT_NE(r.out.find("ktune run --config " + f), std::string::npos) << f;
  }
  const Placement best = load_placement(out, &cfg);
  const Placement nograph = load_placement(path("plans/best-nograph.yaml"), &cfg);
  EXPECT_TRUE(best.runtime.cuda_graph);
  EXPECT_FALSE(nograph.runtime.cuda_graph);
  EXPECT_EQ(read_all(out).rfind("# Written by `ktune search`", 0), 0u);
}

TEST_F(SearchCli, JsonIsTheWholePlan) {
  const ProcessResult r =
      run_ktune({"search", "--profile", kProfile, "--model", "synth:qwen3-30b-a3b:q4_0",
                 "--gpu-mem", "10GiB", "--json", "--top", "3"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto doc = nlohmann::json::parse(r.out);
  EXPECT_EQ(doc["ktune_search"], 1);
  EXPECT_EQ(doc["model"]["layers"], 48);
  ASSERT_GE(doc["candidates"].size(), 3u);
  const auto& best = doc["candidates"][doc["best"].get<int>() - 1];
  EXPECT_TRUE(best["settings"]["cuda_graph"].get<bool>());
  EXPECT_EQ(best["gpu_expert_ids"].size(), 48u);
  EXPECT_LE(best["memory"]["cuda:0"]["total_bytes"].get<int64_t>(), int64_t{10} << 30);
  EXPECT_GT(best["predicted"]["decode_tok_s"].get<double>(), 0);
  EXPECT_EQ(doc["baselines"].size(), 3u);
  EXPECT_TRUE(doc["rounding"].is_object());
  EXPECT_FALSE(doc["notes"].empty());  // at least: no router statistics
  EXPECT_EQ(doc["workload"]["name"], "chat");
}

// --router-stats: the machine from one profile, the routing from another (a model profile).
// With experts 0-39 of every layer taking all the routing, a 10 GiB budget (about half the
// experts) holds every hot expert: the GPU carries the whole routing mass, where uniform
// routing gives it only its share of experts; best.yaml names the router file for `run`'s drift
// check.
TEST_F(SearchCli, RouterStatsFromAnotherProfile) {
  profile::ProfileSummary r = test::h100_profile();
  r.kind = "model";
  r.model = {"qwen3-30b-a3b", "q4_0", 48, 128, 8, 2654208};
  r.router.tokens = 2000;
  r.router.counts.assign(48, std::vector<int64_t>(128, 0));
  for (auto& row : r.router.counts) {
    for (int e = 0; e < 40; ++e) row[size_t(e)] = 400;  // 40 x 400 = 2000 tokens x top-8
  }
  const std::string stats = write_profile("router.json", r);
  auto share = [&](bool with_stats) {
    std::vector<std::string> a = {
        "search",    "--profile", kProfile, "--model", "synth:qwen3-30b-a3b:q4_0",
        "--gpu-mem", "10GiB",     "--json", "-o",      path(with_stats ? "hot.yaml" : "flat.yaml")};
    if (with_stats) {
      a.push_back("--router-stats");
      a.push_back(stats);
    }
    const ProcessResult res = run_ktune(a);
    EXPECT_EQ(res.exit_code, 0) << res.err;
    const auto doc = nlohmann::json::parse(res.out);
    EXPECT_EQ(doc["router"]["measured"].get<bool>(), with_stats);
    const auto& best = doc["candidates"][doc["best"].get<int>() - 1];
    return best["predicted"]["gpu_routing_share"].get<double>();
  };
  const double flat = share(false), hot = share(true);
  EXPECT_LT(flat, 0.7);
  EXPECT_GT(hot, 0.97);
  EXPECT_NE(read_all(path("hot.yaml")).find("profile: " + stats), std::string::npos);
  const ProcessResult none = run_ktune({"search", "--profile", kProfile, "--router-stats", kProfile,
                                        "--model", "synth:qwen3-30b-a3b:q4_0"});
  EXPECT_EQ(none.exit_code, 1);
  EXPECT_NE(none.err.find("has no router statistics"), std::string::npos) << none.err;
}

// The README quick start's two ktune steps (tools/quickstart.sh), with their defaults: a profile
// of the embedded model, then a search on that profile writing best.yaml that the planner takes.
TEST_F(SearchCli, QuickStartProfileThenSearchWithDefaults) {
  const std::string prof = path("profile.json");
  const ProcessResult p = run_ktune({"profile", "--model", "synth:tiny", "-p", "32", "-n", "64",
                                     "-q", "-o", prof, "--report", path("report.html"),
                                     "--trace", path("trace.json")});
  ASSERT_EQ(p.exit_code, 0) << p.err;
  const ProcessResult s = run_ktune(
      {"search", "--profile", prof, "--model", "synth:tiny", "-o", path("best.yaml")});
  ASSERT_EQ(s.exit_code, 0) << s.err;
  EXPECT_NE(s.out.find("# best"), std::string::npos) << s.out;
  const ModelConfig cfg = *find_preset("tiny");
  EXPECT_NO_THROW(load_placement(path("best.yaml"), &cfg));
  EXPECT_TRUE(fs::exists(path("best-nograph.yaml")));
}

// --calibrate: a CPU-engine profile of tiny (every expert on the CPU) measures its CPU experts'
// bandwidth; the machine profile's CpuMoe curve is scaled to it at the profile's thread count.
// A machine profile that claims 10x that rate predicts a faster CPU engine before calibration.
TEST_F(SearchCli, CalibrateScalesTheCpuExpertCurveToTheEngine) {
  const std::string run = path("tiny-run.json");
  const ProcessResult p = run_ktune({"profile", "--model", "synth:tiny", "-p", "0", "-n", "32",
                                     "-t", "1", "--baseline-windows", "1", "-q", "-o", run});
  ASSERT_EQ(p.exit_code, 0) << p.err;
  const auto doc = nlohmann::json::parse(read_all(run));
  double measured = 0;
  for (const auto& e : doc["windows"]["decode"]["expert_bandwidth"]) {
    if (e["device"] == "cpu") measured = e["gb_s"].get<double>();
  }
  ASSERT_GT(measured, 0);
  bool hint = false;  // the profile says how to use it
  for (const auto& n : doc["notes"]) {
    hint = hint || n.get<std::string>().find("--calibrate " + run) != std::string::npos;
  }
  EXPECT_TRUE(hint) << doc["notes"].dump();
  profile::ProfileSummary s = test::cpu_only_profile();
  s.cpu_costs.moe_decode_gb_s = {{1, 10 * measured}, {2, 20 * measured}};
  const std::string prof = write_profile("fast.json", s);
  auto search = [&](bool calibrate) {
    std::vector<std::string> a = {"search",           "--profile",  prof,
                                  "--model",          "synth:tiny", "--workload",
                                  "prompt=16,gen=64", "--json"};
    if (calibrate) {
      a.push_back("--calibrate");
      a.push_back(run);
    }
    const ProcessResult r = run_ktune(a);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return nlohmann::json::parse(r.out);
  };
  const auto before = search(false), after = search(true);
  bool noted = false;
  for (const auto& n : after["notes"]) {
    noted = noted || n.get<std::string>().find("scaled by 0.10") != std::string::npos;
  }
  EXPECT_TRUE(noted) << after["notes"].dump();
  EXPECT_LT(after["candidates"][0]["predicted"]["decode_tok_s"].get<double>(),
            before["candidates"][0]["predicted"]["decode_tok_s"].get<double>());
  // A profile of another shape, or one whose CPU experts carried no bytes, is refused.
  const ProcessResult other = run_ktune(
      {"search", "--profile", prof, "--model", "synth:qwen3-30b-a3b:q4_0", "--calibrate", run});
  EXPECT_EQ(other.exit_code, 1);
  EXPECT_NE(other.err.find("not a profile of a model of this shape"), std::string::npos)
      << other.err;
  const ProcessResult hw =
      run_ktune({"search", "--profile", prof, "--model", "synth:tiny", "--calibrate", prof});
  EXPECT_EQ(hw.exit_code, 1);
}

// The quick start's search: the default chat workload (8192-token context) on synth:tiny, trained
// on 4096 tokens, is scaled to the model's context with a note, not refused; a workload given on
// the command line that does not fit is still an error.
TEST_F(SearchCli, DefaultWorkloadFitsAShortContextModel) {
  const std::string prof = write_profile("cpu.json", test::cpu_only_profile());
  const ProcessResult r =
      run_ktune({"search", "--profile", prof, "--model", "synth:tiny", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto doc = nlohmann::json::parse(r.out);
  EXPECT_EQ(doc["workload"]["context"], 4096);
  for (const auto& q : doc["workload"]["requests"]) {
    EXPECT_LE(q["prompt"].get<int64_t>() + q["gen"].get<int64_t>(), 4096) << q.dump();
  }
  bool noted = false;
  for (const auto& n : doc["notes"]) {
    noted = noted || n.get<std::string>().find("scaled by 0.50") != std::string::npos;
  }
  EXPECT_TRUE(noted) << doc["notes"].dump();
  const ProcessResult given = run_ktune({"search", "--profile", prof, "--model", "synth:tiny",
                                         "--workload", "prompt=512,gen=64,context=8192"});
  EXPECT_EQ(given.exit_code, 2);
  EXPECT_NE(given.err.find("exceeds the model's trained context"), std::string::npos) << given.err;
}

TEST_F(SearchCli, ExportsAreTheWholeLayerRoundingAndReadBack) {
  const std::vector<std::string> common = {
      "search", "--profile", kProfile, "--model", "synth:qwen3-30b-a3b:q4_0", "--gpu-mem", "10GiB"};
  auto args = common;
  for (const char* a : {"--emit", "llama-cpp", "-o"}) args.push_back(a);
  args.push_back(path("ot.txt"));
  args.push_back("--json");
  const ProcessResult r = run_ktune(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto doc = nlohmann::json::parse(r.out);
  const auto counts =
      doc["rounding"]["whole_layer"]["gpu_experts_per_layer"].get<std::vector<int64_t>>();
  ASSERT_EQ(counts.size(), 48u);
  const std::vector<bool> cpu = read_llama_cpp_overrides(read_all(path("ot.txt")), 48);
  int gpu_layers = 0;
  for (size_t l = 0; l < 48; ++l) {
    EXPECT_EQ(cpu[l], counts[l] == 0) << l;
    gpu_layers += counts[l] == 128;
  }
  EXPECT_GT(gpu_layers, 0);
  EXPECT_LT(gpu_layers, 48);
  EXPECT_GT(doc["rounding"]["request_time_change"].get<double>(), -1e-9);  // rounding never helps

  args = common;
  for (const char* a : {"--emit", "ktransformers", "-o"}) args.push_back(a);
  args.push_back(path("rules.yaml"));
  const ProcessResult k = run_ktune(args);
  ASSERT_EQ(k.exit_code, 0) << k.err;
  EXPECT_NE(k.out.find("# whole layers"), std::string::npos);
  EXPECT_NE(k.out.find("vs the per-expert plan"), std::string::npos);
  const std::vector<std::string> dev =
      read_ktransformers_expert_devices(read_all(path("rules.yaml")), 48);
  for (size_t l = 0; l < 48; ++l) EXPECT_EQ(dev[l], counts[l] ? "cuda:0" : "cpu") << l;
  EXPECT_FALSE(fs::exists(path("best.yaml")));  // an export writes only the export
}

TEST_F(SearchCli, VerifyRunsTheTopCandidatesOnThisMachine) {
  // A CPU-only machine of 2 cores where 1 thread has the better decode bandwidth and 2 the
  // better prefill: two candidates, both run on the CPU engine here, chosen by measured time.
  profile::ProfileSummary s = test::cpu_only_profile();
  s.cpu.physical_cores = 2;
  s.cpu.logical_cpus = 2;
  s.cpu.read_gb_s = {{1, 10}, {2, 12}};
  s.cpu_costs.moe_decode_gb_s = {{1, 9}, {2, 8}};
  s.cpu_costs.prefill_gflop_s = {{1, 20}, {2, 38}};
  const std::string prof = write_profile("cpu.json", s);
  const ProcessResult r =
      run_ktune({"search", "--profile", prof, "--model", "synth:tiny", "--workload",
                 "prompt=32,gen=8", "--verify", "2", "-r", "1", "--json", "-o", path("best.yaml")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto doc = nlohmann::json::parse(r.out);
  // The top 2 first, then every baseline the search compares with (measured in the same process).
  ASSERT_EQ(doc["verify"].size(), 2u + doc["baselines"].size()) << r.out;
  EXPECT_EQ(doc["verify"][0]["rank"], 1);
  EXPECT_EQ(doc["verify"][1]["rank"], 2);
  for (size_t i = 2; i < doc["verify"].size(); ++i) {
    EXPECT_EQ(doc["verify"][i]["baseline"], doc["baselines"][i - 2]["label"]) << r.out;
  }
  for (const auto& v : doc["verify"]) {
    EXPECT_EQ(v["engine"], "cpu");
    EXPECT_GT(v["decode_tok_s"]["mean"].get<double>(), 0);
    EXPECT_GT(v["prefill_tok_s"]["mean"].get<double>(), 0);
    EXPECT_GT(v["measured_request_s"].get<double>(), 0);
  }
  EXPECT_TRUE(fs::exists(path("best.yaml")));
  EXPECT_TRUE(fs::exists(path("best-nograph.yaml")));
  EXPECT_NE(read_all(path("best.yaml")).find("Measured by --verify"), std::string::npos);
  // The chosen file holds the candidate with the least measured request time.
  const auto& ver = doc["verify"];
  const int fastest = ver[0]["measured_request_s"] <= ver[1]["measured_request_s"] ? 0 : 1;
  const int threads = doc["candidates"][fastest]["settings"]["cpu_threads"];
  const ModelConfig cfg = *find_preset("tiny");
  EXPECT_EQ(load_placement(path("best.yaml"), &cfg).runtime.cpu_threads, threads);
}

TEST_F(SearchCli, BadInputsAreOneLineErrorsWithExitCodes) {
  const std::vector<std::string> base = {"search", "--model", "synth:qwen3-30b-a3b:q4_0"};
  auto run = [&](std::vector<std::string> extra, bool with_profile = true) {
    std::vector<std::string> a = base;
    if (with_profile) {
      a.push_back("--profile");
      a.push_back(kProfile);
    }
    a.insert(a.end(), extra.begin(), extra.end());
    return run_ktune(a);
  };
  // Profiles.
  expect_one_line_error(run({"--profile", path("none.json")}, false), 1, "none.json");
  expect_one_line_error(run({"--profile", write("bad.json", "{not json")}, false), 1, "bad.json");
  std::string text = read_all(kProfile);
  const std::string key = "\"launch_eager_us\": 3.3";
  ASSERT_NE(text.find(key), std::string::npos);
  text.replace(text.find(key), key.size(), "\"launch_eager_us\": -1");
  expect_one_line_error(run({"--profile", write("neg.json", text)}, false), 1,
                        "summary.gpu_costs[0].launch_eager_us");
  // Models.
  expect_one_line_error(run_ktune({"search", "--profile", kProfile, "--model", "synth:nope"}), 2,
                        "nope");
  expect_one_line_error(run_ktune({"search", "--profile", kProfile, "--model", path("m.gguf")}), 1,
                        "m.gguf");
  // Workloads.
  expect_one_line_error(run({"--workload", "prompt=abc,gen=1"}), 2, "--workload");
  expect_one_line_error(run({"--workload", "prompt=4096,gen=64,context=1024"}), 2, "context");
  expect_one_line_error(run({"--workload", "prompt=40000,gen=1000"}), 2, "trained context");
  // Budgets.
  expect_one_line_error(run({"--gpu-mem", "cuda:0=lots"}), 2, "--gpu-mem");
  expect_one_line_error(run({"--gpu-mem", "1GiB", "--cpu-mem", "1GiB"}), 1, "no placement fits");
  const std::string cpu_prof = write_profile("cpu.json", test::cpu_only_profile());
  expect_one_line_error(run({"--profile", cpu_prof, "--gpu-mem", "10GiB"}, false), 2,
                        "without a GPU");
  // Flags.
  expect_one_line_error(run({"--top", "0"}), 2, "--top");
  expect_one_line_error(run({"--emit", "vllm", "-o", path("x")}), 2, "--emit");
  expect_one_line_error(run({"--emit", "llama-cpp"}), 2, "-o");
  expect_one_line_error(run({"--assume", "bogus=1"}), 2, "bogus");
  expect_one_line_error(run({}, false), 2, "--profile");
  EXPECT_FALSE(fs::exists(path("x")));
}

TEST_F(SearchCli, ProfilesAreFoundByName) {
  // Through $KTUNE_PROFILES (the child inherits it), with or without .json. (Also found without
  // it from an in-tree build: build/bin/ktune -> ../../profiles.)
  setenv("KTUNE_PROFILES", test::profiles_dir().c_str(), 1);
  for (const char* name : {"h100-16core-handmade", "h100-16core-handmade.json"}) {
    const ProcessResult r = run_ktune({"search", "--profile", name, "--model", "synth:tiny",
                                       "--workload", "prompt=64,gen=16", "--json"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto doc = nlohmann::json::parse(r.out);
    EXPECT_NE(doc["profile"]["path"].get<std::string>().find("profiles/h100-16core-handmade.json"),
              std::string::npos);
  }
  // An unknown name lists what there is.
  expect_one_line_error(
      run_ktune({"search", "--profile", "no-such-machine", "--model", "synth:tiny"}), 1,
      "h100-16core-handmade");
  unsetenv("KTUNE_PROFILES");
}

TEST_F(SearchCli, HelpTeachesWithAnExample) {
  const ProcessResult r = run_ktune({"search", "--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("Example: ktune search"), std::string::npos) << r.out;
}

// The committed hand-made two-GPU profile: the layer split and its comparison with the even
// split are printed, the placements put layers on both GPUs within each GPU's own budget, and the
// llama.cpp export has the -ot list and the --tensor-split line.
TEST_F(SearchCli, TwoGpuProfileSplitsLayersWithinEachBudget) {
  const std::string prof = test::profiles_dir() + "/h100x2-nvlink-handmade.json";
  const ModelConfig cfg = *find_preset("qwen3-30b-a3b");
  const ProcessResult r =
      run_ktune({"search", "--profile", prof, "--model", "synth:qwen3-30b-a3b:q4_0", "--gpu-mem",
                 "cuda:0=5GiB,cuda:1=7GiB", "-o", path("best.yaml")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("searched split (layers "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("baseline-even-split.yaml  (even layer split (2 GPUs"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("cuda:0/1 GiB"), std::string::npos) << r.out;
  Budgets b;
  b.bytes["cuda:0"] = 5 * kGiB;
  b.bytes["cuda:1"] = 7 * kGiB;
  for (const char* f : {"best.yaml", "best-nograph.yaml"}) {
    const Placement p = load_placement(path(f), &cfg);
    std::set<std::string> devs;
    for (const LayerPlacement& lp : p.layers) devs.insert(lp.attention.to_string());
    EXPECT_EQ(devs, (std::set<std::string>{"cuda:0", "cuda:1"})) << f;
    EXPECT_NO_THROW(check_fits(plan_memory(cfg, QuantType::Q4_0, QuantType::Q4_0, p, b))) << f;
  }
  const ProcessResult e =
      run_ktune({"search", "--profile", prof, "--model", "synth:qwen3-30b-a3b:q4_0", "--gpu-mem",
                 "cuda:0=5GiB,cuda:1=7GiB", "--emit", "llama-cpp", "-o", path("ot.txt")});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  EXPECT_NE(e.out.find("--tensor-split \"$(sed -n 2p"), std::string::npos) << e.out;
  const std::string ot = read_all(path("ot.txt"));
  EXPECT_EQ(count_lines(ot), 2) << ot;
  const LlamaCppPlacement lp = read_llama_cpp_placement(ot, cfg.n_layers);
  EXPECT_EQ(lp.layers.front(), "cuda:0");
  EXPECT_EQ(lp.layers.back(), "cuda:1");
  const ProcessResult j =
      run_ktune({"search", "--profile", prof, "--model", "synth:qwen3-30b-a3b:q4_0", "--json"});
  ASSERT_EQ(j.exit_code, 0) << j.err;
  const nlohmann::json doc = nlohmann::json::parse(j.out);
  ASSERT_FALSE(doc["split_vs_even"].empty());
  EXPECT_EQ(doc["split_vs_even"][0]["gpus"], 2);
  EXPECT_EQ(doc["candidates"][0]["layer_devices"].size(), 48u);
}

// The recorded H100 profile carries the PCIe assist probe: with most experts on the CPU the
// search picks the assist, shows it in the table's moe column, writes it into best.yaml and
// gives it in --json.
TEST_F(SearchCli, PicksAndShowsThePcieAssist) {
  const std::string out = path("assist.yaml");
  const std::vector<std::string> args = {
      "search", "--profile", test::profiles_dir() + "/h100-16core.json", "--model",
      "synth:qwen3-30b-a3b:q4_0", "--gpu-mem", "cuda:0=10GiB", "--workload",
      "prompt=16,gen=128,context=4096", "-o", out};
  const ProcessResult r = run_ktune(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("| fused+pcie 0."), std::string::npos) << r.out;
  EXPECT_NE(read_all(out).find("pcie_assist: 0."), std::string::npos) << read_all(out);
  std::vector<std::string> json_args = args;
  json_args.push_back("--json");
  const ProcessResult j = run_ktune(json_args);
  ASSERT_EQ(j.exit_code, 0) << j.err;
  const auto doc = nlohmann::json::parse(j.out);
  EXPECT_GT(doc["candidates"][0]["settings"]["pcie_assist"].get<double>(), 0.0);
}

// The recorded profiles in profiles/ (ktune profile --hardware on the H100 machine and on the 2-
// and 4-GPU hosts) drive a search on a machine without a GPU: 235B on the one-GPU machine puts
// part of the experts on the CPU; on the 2- and 4-GPU hosts it uses every GPU.
TEST_F(SearchCli, RecordedProfilesSearchWithoutAGpu) {
  struct Case {
    const char* file;
    const char* expect;
  };
  for (const Case& c : {Case{"h100-16core.json", "cpu"}, Case{"h100x2-nvlink.json", "cuda:1"},
                        Case{"h100x4-nvlink.json", "cuda:3"}}) {
    SCOPED_TRACE(c.file);
    const std::string out = path(std::string(c.file) + ".best.yaml");
    const ProcessResult r = run_ktune({"search", "--profile", test::profiles_dir() + "/" + c.file,
                                       "--model", "synth:qwen3-235b-a22b:q4_0", "-o", out});
    ASSERT_FALSE(r.signaled) << r.err;
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("recorded"), std::string::npos) << r.out;
    const std::string yaml = read_all(out);
    EXPECT_NE(yaml.find(c.expect), std::string::npos) << yaml;
  }
}

// DeepSeek-V3 over four GPUs from a recorded profile: the totals count the 58 MoE layers' routed
// experts (58 x 256), not the 3 dense leading layers' empty slots.
TEST_F(SearchCli, DeepseekTotalsCountOnlyRoutedExperts) {
  const std::string out = path("ds3.best.yaml");
  const ProcessResult r =
      run_ktune({"search", "--profile", test::profiles_dir() + "/h200x4-nvlink.json", "--model",
                 "synth:deepseek-v3:q4_0", "-o", out});
  ASSERT_FALSE(r.signaled) << r.err;
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(read_all(out).find(" of 14848 ("), std::string::npos) << read_all(out);
  EXPECT_NE(r.out.find("/14848 "), std::string::npos) << r.out;
}

// --predict prices given placements instead of searching: the example configs of qwen3-30b-a3b,
// every expert on the GPU faster than half of them, faster than none; a placement of another
// model's shape is one error line naming the file.
TEST_F(SearchCli, PredictPricesGivenPlacements) {
  const std::string ex = test::profiles_dir() + "/../configs/examples/";
  const std::string all = ex + "qwen3-30b-all-gpu.yaml",
                    half = ex + "qwen3-30b-24-layers-on-cpu.yaml",
                    none = ex + "qwen3-30b-experts-on-cpu.yaml";
  const ProcessResult r =
      run_ktune({"search", "--profile", kProfile, "--model", "synth:qwen3-30b-a3b:q4_0",
                 "--predict", all + "," + half + "," + none, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto doc = nlohmann::json::parse(r.out);
  ASSERT_EQ(doc.size(), 3u);
  EXPECT_EQ(doc[0]["gpu_experts"].get<int64_t>(), 48 * 128);
  EXPECT_EQ(doc[2]["gpu_experts"].get<int64_t>(), 0);
  EXPECT_GT(doc[0]["decode_tok_s"].get<double>(), doc[1]["decode_tok_s"].get<double>());
  EXPECT_GT(doc[1]["decode_tok_s"].get<double>(), doc[2]["decode_tok_s"].get<double>());
  const ProcessResult bad =
      run_ktune({"search", "--profile", kProfile, "--model", "synth:tiny", "--workload",
                 "prompt=16,gen=16,context=512", "--predict", all});
  EXPECT_EQ(bad.exit_code, 1) << bad.err;
  EXPECT_EQ(count_lines(bad.err), 1) << bad.err;
  EXPECT_NE(bad.err.find("qwen3-30b-all-gpu.yaml"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace ktune::search
