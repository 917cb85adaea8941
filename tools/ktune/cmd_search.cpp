// `ktune search`: flags -> SearchOptions -> run_search() (search/search.h), then the ranked
// table or JSON, the placement files (best.yaml, best-nograph.yaml, the other candidates beside
// them), the exports (--emit), and --verify on the real engine (run_bench.h).
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>

#include "cli.h"
#include "ktune/engine/atomic_file.h"
#include "ktune/engine/build_info.h"
#include "ktune/engine/error.h"
#include "model_arg.h"
#include "run_bench.h"
#include "search/emit.h"
#include "search/search.h"

namespace ktune::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using search::Candidate;
using search::SearchResult;

struct SearchFlags {
  std::string profile;
  std::string router_stats;  // another profile whose router statistics replace --profile's
  std::string calibrate;     // a model profile whose CPU experts' measured rate scales the curve
  std::string model;
  std::string gpu_mem, cpu_mem;
  std::string workload = "chat";
  std::string assume;
  int top = 5;
  int verify = 0;
  int reps = 3;
  bool json = false;
  std::string emit = "native";
  std::string output;
  std::string solver = "auto";
  std::vector<std::string> predict;  // placement YAMLs to price instead of searching
};

// Where each candidate's file goes with -o FILE: the best graph-on placement in FILE, the best
// graph-off one in FILE-nograph, the others in FILE's stem + ".candidates/".
struct Layout {
  std::string best, nograph, folder;
  static Layout of(const std::string& out) {
    Layout l;
    const fs::path p(out);
    const std::string ext = p.has_extension() ? p.extension().string() : ".yaml";
    const fs::path dir = p.parent_path();
    const std::string stem = p.stem().string();
    l.best = out;
    l.nograph = (dir / (stem + "-nograph" + ext)).string();
    l.folder = (dir / (stem + ".candidates")).string();
    return l;
  }
};

std::string pct(double x) { return fmt::format("{:.1f} %", 100.0 * x); }

std::string mem_of(const Candidate& c, const std::string& dev) {
  auto it = c.plan.per_device.find(dev);
  if (it == c.plan.per_device.end()) return "-";
  return fmt::format("{:.1f}", double(it->second.total) / double(kGiB));
}

json candidate_json(const Candidate& c, bool with_layers) {
  const search::Prediction& p = c.pred;
  json j = {{"label", c.label},
            {"baseline", c.baseline},
            {"whole_layers", c.whole_layers},
            {"settings",
             {{"engine", c.settings.gpu ? "gpu+cpu" : "cpu"},
              {"cuda_graph", c.settings.gpu && c.settings.cuda_graph},
              {"moe_kernel", moe_kernel_name(c.settings.kernel)},
              {"cpu_handoff", cpu_handoff_name(c.settings.handoff)},
              {"pcie_assist", c.settings.pcie_assist_permille / 1000.0},
              {"cpu_threads", c.settings.cpu_threads}}},
            {"predicted",
             {{"request_s", p.request_s},
              {"prefill_s", p.prefill_s},
              {"decode_s", p.decode_s},
              {"prefill_tok_s", p.prefill_tok_s},
              {"decode_tok_s", p.decode_tok_s},
              {"decode_ms_per_token", p.decode_ms},
              {"gpu_routing_share", p.gpu_mass},
              {"gpu_experts", p.gpu_experts},
              {"hybrid_layers", p.hybrid_layers},
              {"cpu_layers", p.cpu_layers},
              {"prefill_copy_layers", p.copy_layers}}}};
  json mem = json::object();
  for (const auto& [dev, u] : c.plan.per_device) {
    mem[dev] = {{"total_bytes", u.total},
                {"weights_bytes", u.weights},
                {"kv_cache_bytes", u.kv_cache},
                {"workspace_bytes", u.workspace},
                {"graph_pool_bytes", u.graph_pool},
                {"budget_bytes", u.budget >= 0 ? json(u.budget) : json(nullptr)}};
  }
  j["memory"] = mem;
  j["gpu_experts_per_layer"] = c.gpu_counts;
  // Where each layer runs (attention and its GPU experts): "cuda:N" or "cpu".
  json devs = json::array();
  for (const LayerPlacement& lp : c.placement.layers) devs.push_back(lp.attention.to_string());
  j["layer_devices"] = devs;
  if (with_layers && c.settings.gpu) {
    json layers = json::array();
    for (size_t l = 0; l < c.on_gpu.size(); ++l) {
      std::vector<int64_t> ids;
      for (size_t e = 0; e < c.on_gpu[l].size(); ++e) {
        if (c.on_gpu[l][e]) ids.push_back(int64_t(e));
      }
      layers.push_back(ids);
    }
    j["gpu_expert_ids"] = layers;
  }
  return j;
}

// The mean request time of the workload from measured prefill and decode rates.
double measured_request_s(const search::Workload& w, double pp, double tg) {
  double t = 0;
  for (const search::Request& r : w.requests) {
    t += r.weight / w.total_weight() *
         ((pp > 0 ? double(r.prompt) / pp : 0.0) + (tg > 0 ? double(r.gen) / tg : 0.0));
  }
  return t;
}

bool multi_gpu_profile(const SearchResult& r) { return r.machine.gpus.size() > 1; }

void write_text(const std::string& path, const std::string& text) {
  const fs::path dir = fs::path(path).parent_path();
  if (!dir.empty()) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec)
      throw Error(dir.string(), "cannot create the folder (" + ec.message() + ")",
                  "choose a writable -o path");
  }
  remove_stale_temp_files(path, true);
  write_file_atomic(path, text);
}

// --calibrate: the CPU experts' bandwidth measured inside the engine (`ktune profile --model`
// with CPU experts) against the machine profile's CpuMoe probe at the same thread count; the
// probe's curve is scaled by their ratio. Why: the probe calls CpuMoe back to back on a warm
// pool, the engine between GPU layers with the hand-off in between, and on the H100 machine the
// engine's CPU experts ran at 77-86 GB/s where the probe read 95-100 (hybrid predictions 10-15 %
// high until calibrated, docs/search.md). Only a profile whose CPU experts carried at least a
// quarter of the routed bytes counts: with a few experts per call the rate is mostly call cost,
// which the model prices apart (cpu_call_us).
void calibrate_cpu_experts(search::SearchOptions& opt, const std::string& path) {
  const json doc = profile::read_profile_document(path);
  const profile::ProfileSummary ps = profile::summary_of(doc, path);
  const ModelConfig& mc = opt.model.cfg;
  const std::string fix =
      "give a `ktune profile --model <this model> --experts-on-gpu 0 -o <file>` "
      "run of this machine";
  if (ps.kind != "model" || ps.model.n_layers != mc.n_layers ||
      ps.model.n_experts != mc.n_experts || ps.model.n_experts_used != mc.n_experts_used) {
    throw Error(path, "is not a profile of a model of this shape (" + ps.model.name + ")", fix);
  }
  double bytes = 0, gb_s = 0, tokens = 0;
  int threads = 0;
  try {
    const json& w = doc.at("windows").at("decode");
    tokens = w.at("tokens").get<double>();
    for (const json& e : w.at("expert_bandwidth")) {
      if (e.at("device").get<std::string>() == "cpu") {
        bytes = e.at("bytes").get<double>();
        gb_s = e.at("gb_s").get<double>();
      }
    }
    threads = doc.at("run").at("threads").get<int>();
  } catch (const json::exception&) {
    throw Error(path, "has no decode window with CPU expert bandwidth", fix);
  }
  double routed = 0;  // expert bytes a token routes, all layers
  for (int64_t l = 0; l < mc.n_layers; ++l) {
    if (!mc.is_dense_layer(l)) {
      routed += double(mc.n_experts_used) * double(opt.model.bytes.expert[size_t(l)]);
    }
  }
  if (!(gb_s > 0) || !(tokens > 0) || threads < 1 || bytes / tokens < 0.25 * routed) {
    throw Error(path,
                fmt::format("its CPU experts read {:.0f} MB per token, under a quarter of the "
                            "{:.0f} MB a token routes: too few for a bandwidth",
                            tokens > 0 ? bytes / tokens / 1e6 : 0.0, routed / 1e6),
                fix);
  }
  auto& curve = opt.profile.cpu_costs.moe_decode_gb_s;
  const double probe = profile::rate_at(curve, threads);
  if (!(probe > 0)) {
    throw Error(opt.profile_path, "has no CPU expert curve (cpu_costs.moe_decode_gb_s) to scale",
                "record it with `ktune profile --hardware`");
  }
  const double ratio = gb_s / probe;
  for (auto& r : curve) r.value *= ratio;
  opt.notes.push_back(fmt::format(
      "CPU experts measured in the engine at {:.1f} GB/s ({} threads, {}); the probe read {:.1f}: "
      "CPU expert rates scaled by {:.2f}",
      gb_s, threads, path, probe, ratio));
}

// The default chat mix assumes an 8192-token context; a model trained on less (synth:tiny, the
// quick start's model, has 4096) gets the same mix scaled to its context instead of an error a
// user did not cause. A workload given on the command line is taken as written.
void fit_chat_workload(search::SearchOptions& opt) {
  search::Workload& w = opt.workload;
  const int64_t ctx = opt.model.cfg.context_length;
  if (w.name != "chat" || ctx <= 0 || w.context <= ctx) return;
  const double scale = static_cast<double>(ctx) / static_cast<double>(w.context);
  for (search::Request& r : w.requests) {
    r.prompt = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(r.prompt) * scale));
    r.gen = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(r.gen) * scale));
  }
  w.context = ctx;
  opt.notes.push_back(fmt::format(
      "the chat workload scaled by {:.2f} to the model's trained context of {} tokens (give "
      "--workload to set it)",
      scale, ctx));
}

void run_search_command(const SearchFlags& f) {
  // 1. Flags that need no file.
  if (f.top < 1 || f.top > 100)
    throw_usage("--top", fmt::format("{} is out of range", f.top), "use 1..100");
  if (f.verify < 0 || f.verify > 100) {
    throw_usage("--verify", fmt::format("{} is out of range", f.verify), "use 0..100");
  }
  if (f.reps < 1 || f.reps > 100)
    throw_usage("-r", fmt::format("{} is out of range", f.reps), "use 1..100");
  if (f.emit != "native" && f.emit != "ktransformers" && f.emit != "llama-cpp") {
    throw_usage("--emit", "`" + f.emit + "` is not native, ktransformers or llama-cpp",
                "e.g. --emit llama-cpp -o ot.txt");
  }
  if (f.emit != "native" && f.output.empty()) {
    throw_usage(
        "--emit", "needs -o FILE",
        "e.g. --emit " + f.emit + " -o " + (f.emit == "llama-cpp" ? "ot.txt" : "rules.yaml"));
  }
  if (f.solver != "auto" && f.solver != "greedy" && f.solver != "dp" && f.solver != "exhaustive") {
    throw_usage("--solver", "`" + f.solver + "` is not auto, greedy, dp or exhaustive", "use auto");
  }
  search::SearchOptions opt;
  opt.workload = search::parse_workload(f.workload);
  opt.assumptions = search::parse_assumptions(f.assume);
  opt.top = f.top;
  opt.solver = f.solver;
  // 2. The profile, validated before anything else is read.
  opt.profile_path = search::find_profile(f.profile);
  opt.profile = profile::read_profile_summary(opt.profile_path);
  if (!f.router_stats.empty()) {
    // A machine profile recorded once (profiles/*.json, `profile --hardware`) and the routing of
    // this model measured by `ktune profile --model`: the machine's costs, the model's routing.
    const profile::ProfileSummary r = profile::read_profile_summary(f.router_stats);
    if (r.router.tokens <= 0) {
      throw Error(f.router_stats, "has no router statistics",
                  "record them with `ktune profile --model <model> -n 1024 -o <file>`");
    }
    opt.profile.router = r.router;
    opt.profile.model = r.model;
    opt.router_stats_path = f.router_stats;
  }
  // 3. The model's shape (no weights read) and the budgets of the profile's machine.
  opt.model = search::load_model_info(f.model);
  if (!f.calibrate.empty()) calibrate_cpu_experts(opt, f.calibrate);
  fit_chat_workload(opt);
  search::check_workload_for_model(opt.workload, opt.model.cfg);
  for (const profile::GpuInfo& g : opt.profile.gpus) {
    opt.budgets.bytes[g.device] = std::max<int64_t>(0, g.mem_bytes - kGpuBudgetHeadroom);
  }
  if (opt.profile.cpu.mem_available_bytes > 0) {
    opt.budgets.bytes["cpu"] =
        std::max<int64_t>(0, opt.profile.cpu.mem_available_bytes - kHostBudgetHeadroom);
  }
  if (opt.profile.gpus.empty()) opt.budgets.gpu_note = "the profile's machine has no GPU";
  if (!f.gpu_mem.empty()) {
    if (opt.profile.gpus.empty()) {
      throw_usage("--gpu-mem", "the profile describes a machine without a GPU",
                  "drop --gpu-mem, or use a profile recorded on a machine with a GPU");
    }
    apply_budget_overrides(opt.budgets, f.gpu_mem, "--gpu-mem", Device::Cuda);
  }
  if (!f.cpu_mem.empty()) apply_budget_overrides(opt.budgets, f.cpu_mem, "--cpu-mem", Device::Cpu);

  // 4. Predict given placements (no search), or search.
  if (!f.predict.empty()) {
    std::vector<Placement> ps;
    for (const std::string& path : f.predict) ps.push_back(load_placement(path, &opt.model.cfg));
    const std::vector<Candidate> cs = search::predict_placements(opt, ps);
    if (f.json) {
      json doc = json::array();
      for (const Candidate& c : cs) {
        doc.push_back(
            {{"placement", c.label},
             {"settings", c.settings.describe()},
             {"gpu_experts", std::accumulate(c.gpu_counts.begin(), c.gpu_counts.end(), int64_t{0})},
             {"decode_tok_s", c.pred.decode_tok_s},
             {"decode_ms_per_token", c.pred.decode_ms},
             {"prefill_tok_s", c.pred.prefill_tok_s},
             {"request_s", c.pred.request_s}});
      }
      fmt::print("{}\n", doc.dump(2));
      return;
    }
    fmt::print("# ktune search --predict  commit {}  (ktune {})\n", build_commit(),
               build_version());
    fmt::print("# profile: {}\n# model: {}\n# workload: {}\n\n", opt.profile_path, f.model,
               f.workload);
    fmt::print(
        "| placement | settings | GPU experts | decode tok/s | decode ms/token | prefill tok/s "
        "| request s |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
    for (const Candidate& c : cs) {
      fmt::print("| {} | {} | {} | {:.2f} | {:.3f} | {:.1f} | {:.2f} |\n", c.label,
                 c.settings.describe(),
                 std::accumulate(c.gpu_counts.begin(), c.gpu_counts.end(), int64_t{0}),
                 c.pred.decode_tok_s, c.pred.decode_ms, c.pred.prefill_tok_s, c.pred.request_s);
    }
    return;
  }
  SearchResult res = search::run_search(opt);
  const Layout lay = Layout::of(f.output.empty() ? std::string("best.yaml") : f.output);
  const bool native_files = !f.output.empty() && f.emit == "native";

  // 5. Files and commands for every row.
  std::vector<std::string> files(res.ranked.size()), base_files(res.baselines.size());
  auto assign_files = [&] {
    for (size_t i = 0; i < res.ranked.size(); ++i) {
      files[i] = int(i) == res.best_graph ? lay.best
                 : int(i) == res.best_nograph
                     ? lay.nograph
                     : (fs::path(lay.folder) / fmt::format("rank-{}.yaml", i + 1)).string();
    }
  };
  assign_files();
  for (size_t i = 0; i < res.baselines.size(); ++i) {
    const std::string& label = res.baselines[i].label;
    const Candidate& b = res.baselines[i];
    std::string name = label.find("--fit") != std::string::npos              ? "baseline-fit"
                       : label.find("n-cpu-moe") != std::string::npos        ? "baseline-n-cpu-moe"
                       : label.find("even layer split") != std::string::npos ? "baseline-even-split"
                                                                             : "baseline-uniform";
    if (name == "baseline-even-split" && b.settings.gpu && !b.settings.cuda_graph) {
      name += "-nograph";
    }
    base_files[i] = (fs::path(lay.folder) / (name + ".yaml")).string();
  }
  auto command = [&](const std::string& file) { return "ktune run --config " + file; };

  // 6. --verify: the top N and the baselines on this machine, the model loaded once; files
  // chosen by measured. The baselines run in the same process so "faster than what users do
  // today" is a measurement, not a prediction.
  json verify_json = json::array();
  std::vector<double> measured(res.ranked.size(), -1);
  std::vector<std::string> verify_lines;
  if (f.verify > 0) {
    const size_t n = std::min<size_t>(size_t(f.verify), res.ranked.size());
    std::vector<Placement> ps;
    std::vector<std::string> labels;
    std::vector<const Candidate*> cands;
    for (size_t i = 0; i < n; ++i) {
      ps.push_back(res.ranked[i].placement);
      labels.push_back(fmt::format("rank {}", i + 1));
      cands.push_back(&res.ranked[i]);
    }
    for (size_t i = 0; i < res.baselines.size(); ++i) {
      ps.push_back(res.baselines[i].placement);
      labels.push_back(fs::path(base_files[i]).stem().string());
      cands.push_back(&res.baselines[i]);
    }
    // The request of the mix with the most weight stands for the workload in the benchmark.
    const search::Request* rep = &opt.workload.requests[0];
    for (const search::Request& r : opt.workload.requests) {
      if (r.weight > rep->weight) rep = &r;
    }
    MeasureSettings ms;
    ms.prompt = rep->prompt;
    ms.gen = rep->gen;
    ms.reps = f.reps;
    ms.gpu_mem = f.gpu_mem;
    ms.cpu_mem = f.cpu_mem;
    ms.quiet = true;
    const std::vector<MeasuredPlacement> got = measure_placements(f.model, ps, labels, ms);
    verify_lines.push_back(fmt::format(
        "# verify: top {} and {} baseline(s) on this machine, prompt {} + gen {}, {} repetitions "
        "each (mean)",
        n, res.baselines.size(), rep->prompt, rep->gen, f.reps));
    std::vector<double> all_measured(got.size(), -1);
    int within = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const Candidate& c = *cands[i];
      const bool is_base = i >= n;
      all_measured[i] = measured_request_s(opt.workload, got[i].prefill.mean, got[i].decode.mean);
      if (!is_base) measured[i] = all_measured[i];
      const double decode_err = c.pred.decode_tok_s / std::max(1e-9, got[i].decode.mean) - 1;
      within += std::abs(decode_err) <= 0.10 ? 1 : 0;
      verify_lines.push_back(fmt::format(
          "#   {}: decode predicted {:.2f} / measured {:.2f} tok/s (prediction {:+.1f} %), "
          "prefill predicted {:.1f} / measured {:.1f} tok/s (prediction {:+.1f} %), {}, engine {}",
          labels[i], c.pred.decode_tok_s, got[i].decode.mean, 100.0 * decode_err,
          c.pred.prefill_tok_s, got[i].prefill.mean,
          100.0 * (c.pred.prefill_tok_s / std::max(1e-9, got[i].prefill.mean) - 1),
          c.settings.describe(), got[i].engine));
      json j = {{"label", labels[i]},
                {"engine", got[i].engine},
                {"settings", c.settings.describe()},
                {"threads", got[i].threads},
                {"prefill_tok_s", got[i].prefill.to_json()},
                {"decode_tok_s", got[i].decode.to_json()},
                {"predicted_prefill_tok_s", c.pred.prefill_tok_s},
                {"predicted_decode_tok_s", c.pred.decode_tok_s},
                {"measured_request_s", all_measured[i]}};
      if (is_base) {
        j["baseline"] = c.label;
      } else {
        j["rank"] = i + 1;
      }
      verify_json.push_back(j);
    }
    verify_lines.push_back(
        fmt::format("# verify: decode predicted within 10 % of measured for {} of {} placements",
                    within, got.size()));
    // Choose by measured among the verified candidates each file may hold.
    auto choose = [&](int current, bool graph) {
      int best = current;
      double best_t =
          current >= 0 && measured[size_t(current)] >= 0 ? measured[size_t(current)] : -1;
      for (size_t i = 0; i < n; ++i) {
        const Candidate& c = res.ranked[i];
        const bool ok = !c.settings.gpu || c.settings.cuda_graph == graph;
        if (ok && measured[i] >= 0 && (best_t < 0 || measured[i] < best_t)) {
          best = int(i);
          best_t = measured[i];
        }
      }
      return best;
    };
    const int g = choose(res.best_graph, true), ng = choose(res.best_nograph, false);
    if (g != res.best_graph || ng != res.best_nograph) {
      verify_lines.push_back(fmt::format(
          "# verify: chosen by measured time: rank {} for the graph-on file, rank {} for the "
          "graph-off file",
          g + 1, ng + 1));
      res.best_graph = g;
      res.best_nograph = ng;
      assign_files();
    }
    // The pick against every measured baseline (mean request time of the workload).
    const int pick = res.best_graph >= 0 ? res.best_graph : res.best_nograph;
    if (pick >= 0 && measured[size_t(pick)] > 0) {
      for (size_t i = n; i < got.size(); ++i) {
        const double gain = all_measured[i] / measured[size_t(pick)] - 1;
        verify_lines.push_back(fmt::format(
            "# verify: pick (rank {}) {:.3f} s per request, {:.2f} tok/s decode vs {} {:.3f} s, "
            "{:.2f} tok/s: the pick is {}",
            pick + 1, measured[size_t(pick)], got[size_t(pick)].decode.mean, labels[i],
            all_measured[i], got[i].decode.mean,
            gain >= 0 ? fmt::format("{:.1f} % faster", 100 * gain)
                      : fmt::format("{:.1f} % slower", -100 * gain)));
      }
    }
  }

  // 7. Whole-layer rounding (exports), compared with the per-expert plan of the same settings.
  const Candidate* whole = nullptr;
  for (const Candidate& c : res.whole_layer) {
    if (whole == nullptr || (c.settings.cuda_graph && !whole->settings.cuda_graph)) whole = &c;
  }
  std::string rounding_line;
  json rounding = nullptr;
  const Candidate* best = res.best_graph >= 0 ? &res.ranked[size_t(res.best_graph)] : nullptr;
  if (whole != nullptr) {
    const Candidate* ref = nullptr;
    for (const Candidate& c : res.ranked) {
      if (c.settings.key() == whole->settings.key() && !c.whole_layers) {
        ref = &c;
        break;
      }
    }
    if (ref == nullptr) ref = best;
    int64_t gpu_layers = 0;
    for (int64_t n : whole->gpu_counts) gpu_layers += n > 0 ? 1 : 0;
    rounding_line = fmt::format(
        "# whole layers (what llama.cpp -ot and ktransformers rules express){}: experts of {} of "
        "{} layers on the GPU; predicted decode {:.2f} tok/s, prefill {:.1f} tok/s, request {:.2f} "
        "s: {:+.1f} % request time vs the per-expert plan ({:.2f} s)",
        whole->stages.empty() ? std::string() : " " + whole->label.substr(13), gpu_layers,
        whole->gpu_counts.size(), whole->pred.decode_tok_s, whole->pred.prefill_tok_s,
        whole->pred.request_s, 100.0 * (whole->pred.request_s / ref->pred.request_s - 1),
        ref->pred.request_s);
    rounding = {{"whole_layer", candidate_json(*whole, false)},
                {"per_expert_request_s", ref->pred.request_s},
                {"request_time_change", whole->pred.request_s / ref->pred.request_s - 1}};
  }

  // 8. Write.
  json written = json::object();
  if (native_files) {
    for (size_t i = 0; i < res.ranked.size(); ++i) {
      const Candidate& c = res.ranked[i];
      std::vector<std::string> com = search::candidate_comments(c, opt, command(files[i]));
      if (measured[i] >= 0) {
        com.push_back(fmt::format("Measured by --verify on this machine: mean request {:.2f} s",
                                  measured[i]));
      }
      write_text(files[i], search::placement_yaml(c, com));
      // One candidate best for both files (the CPU engine): best-nograph.yaml holds it too.
      if (int(i) == res.best_graph && res.best_graph == res.best_nograph) {
        com = search::candidate_comments(c, opt, command(lay.nograph));
        write_text(lay.nograph, search::placement_yaml(c, com));
      }
    }
    for (size_t i = 0; i < res.baselines.size(); ++i) {
      const Candidate& c = res.baselines[i];
      write_text(base_files[i], search::placement_yaml(
                                    c, search::candidate_comments(c, opt, command(base_files[i]))));
    }
    written["best"] = lay.best;
    written["nograph"] = lay.nograph;
    written["candidates_folder"] = lay.folder;
  } else if (f.emit != "native") {
    if (whole == nullptr) {
      throw Error("--emit " + f.emit, "no whole-layer placement fits the budgets",
                  "raise --gpu-mem or lower the context");
    }
    if (f.emit == "ktransformers") {
      write_text(f.output, search::ktransformers_rules(opt.model, *whole));
    } else {
      write_text(f.output, search::llama_cpp_overrides(*whole) + "\n");
    }
    written["export"] = f.output;
  }

  // 9. Report.
  if (f.json) {
    json doc;
    doc["ktune_search"] = 1;
    doc["ktune_version"] = build_version();
    doc["commit"] = build_commit();
    doc["profile"] = {
        {"path", opt.profile_path},
        {"kind", opt.profile.kind},
        {"cpu", opt.profile.cpu.name},
        {"physical_cores", opt.profile.cpu.physical_cores},
        {"gpu", opt.profile.gpus.empty() ? json(nullptr) : json(opt.profile.gpus[0].name)},
        {"recorded", opt.profile.created},
        {"recorded_commit", opt.profile.commit}};
    const ModelConfig& mc = opt.model.cfg;
    doc["model"] = {
        {"spec", opt.model.spec},
        {"arch", mc.arch},
        {"layers", mc.n_layers},
        {"experts", mc.n_experts},
        {"top_k", mc.n_experts_used},
        {"quant", opt.model.quant},
        {"expert_bytes", opt.model.bytes.expert.empty() ? 0 : opt.model.bytes.expert[0]}};
    json reqs = json::array();
    for (const search::Request& r : opt.workload.requests) {
      reqs.push_back({{"prompt", r.prompt},
                      {"gen", r.gen},
                      {"weight", r.weight / opt.workload.total_weight()}});
    }
    doc["workload"] = {
        {"name", opt.workload.name}, {"requests", reqs}, {"context", opt.workload.context}};
    json budgets = json::object();
    for (const auto& [dev, b] : opt.budgets.bytes) budgets[dev] = b;
    doc["budgets_bytes"] = budgets;
    doc["router"] = {{"measured", res.router.measured},
                     {"tokens", res.router.tokens},
                     {"digest", res.router.digest},
                     {"note", res.router.note}};
    doc["notes"] = res.notes;
    doc["search_seconds"] = res.seconds;
    doc["solves"] = res.solves;
    doc["threads_tried"] = res.threads_tried;
    json cands = json::array();
    for (size_t i = 0; i < res.ranked.size(); ++i) {
      json j = candidate_json(res.ranked[i], true);
      j["rank"] = i + 1;
      if (native_files) {
        j["file"] = files[i];
        j["command"] = command(files[i]);
      }
      cands.push_back(j);
    }
    doc["candidates"] = cands;
    doc["best"] = res.best_graph >= 0 ? json(res.best_graph + 1) : json(nullptr);
    doc["best_nograph"] = res.best_nograph >= 0 ? json(res.best_nograph + 1) : json(nullptr);
    json bases = json::array();
    for (size_t i = 0; i < res.baselines.size(); ++i) {
      json j = candidate_json(res.baselines[i], false);
      if (native_files) {
        j["file"] = base_files[i];
        j["command"] = command(base_files[i]);
      }
      bases.push_back(j);
    }
    doc["baselines"] = bases;
    json split = json::array();
    for (const auto& c : res.split_vs_even) {
      split.push_back(
          {{"settings", c.settings},
           {"gpus", c.gpus},
           {"layers_per_gpu", c.layers_per_gpu},
           {"request_s", c.split_request_s},
           {"even_layers_per_gpu", c.even_layers_per_gpu},
           {"even_request_s", c.even_request_s > 0 ? json(c.even_request_s) : json(nullptr)}});
    }
    doc["split_vs_even"] = split;
    doc["rounding"] = rounding;
    doc["verify"] = verify_json;
    doc["files"] = written;
    std::cout << doc.dump(2) << "\n";
    return;
  }

  const ModelConfig& mc = opt.model.cfg;
  int64_t expert_total = 0;
  for (int64_t b : opt.model.bytes.expert) expert_total += b * mc.n_experts;
  std::cout << fmt::format("# ktune search  commit {}  (ktune {})\n", build_commit(),
                           build_version());
  std::cout << fmt::format(
      "# profile: {} ({}; {}, {} cores{}; recorded {} at commit {})\n", opt.profile_path,
      opt.profile.kind, opt.profile.cpu.name, opt.profile.cpu.physical_cores,
      opt.profile.gpus.empty() ? std::string(", no GPU") : ", " + opt.profile.gpus[0].name,
      opt.profile.created, opt.profile.commit);
  std::cout << fmt::format("# model: {} ({}, {} layers x {} experts top-{}, {}, experts {})\n",
                           opt.model.spec, mc.arch, mc.n_layers, mc.n_experts, mc.n_experts_used,
                           opt.model.quant, format_gib(expert_total));
  std::cout << "# workload: " << opt.workload.describe() << "\n";
  std::string budgets;
  for (const auto& [dev, b] : opt.budgets.bytes)
    budgets += (budgets.empty() ? "" : ", ") + dev + " " + format_gib(b);
  std::cout << "# budgets: " << (budgets.empty() ? std::string("none") : budgets) << "\n";
  std::cout << "# router: "
            << (res.router.measured ? fmt::format("measured over {} tokens ({})", res.router.tokens,
                                                  res.router.digest.substr(0, 19))
                                    : std::string("uniform"))
            << "\n";
  for (const std::string& n : res.notes) std::cout << "# note: " << n << "\n";
  std::cout << fmt::format(
      "# searched {} thread count(s) x {} engine settings, {} solves, in {:.2f} s\n",
      res.threads_tried.size(), res.machine.has_gpu ? 4 : 1, res.solves, res.seconds);
  if (multi_gpu_profile(res)) {
    std::cout << fmt::format(
        "# {} GPUs: layer split and GPU experts searched together (contiguous layer ranges; a "
        "layer's GPU experts on its GPU); decode steps pass through the GPUs in turn, prefill "
        "chunks are pipelined across them\n",
        res.machine.gpus.size());
  }
  for (const std::string& l : verify_lines) std::cout << l << "\n";
  std::cout << "\n";
  int64_t moe_layers = 0;  // deepseek2's dense leading layers have no routed experts
  for (int64_t l = 0; l < mc.n_layers; ++l) moe_layers += mc.is_dense_layer(l) ? 0 : 1;
  const int64_t total_experts = moe_layers * mc.n_experts;
  const std::string gpu = res.machine.has_gpu ? res.machine.gpu_device : std::string("cuda:0");
  // Several GPUs: one memory figure per GPU, "a/b/c/d" (- for a GPU the candidate leaves empty).
  const bool multi = res.machine.gpus.size() > 1;
  std::string gpu_header = gpu + " GiB";
  if (multi) {
    gpu_header = "cuda:0";
    for (size_t g = 1; g < res.machine.gpus.size(); ++g) gpu_header += "/" + std::to_string(g);
    gpu_header += " GiB";
  }
  auto gpu_mem = [&](const Candidate& c) {
    if (!multi) return mem_of(c, gpu);
    std::string out;
    for (const auto& g : res.machine.gpus) out += (out.empty() ? "" : "/") + mem_of(c, g.device);
    return out;
  };
  std::cout << fmt::format(
      "| {:>4} | {:<5} | {:<7} | {:<9} | {:>7} | {:>13} | {:>11} | {:>8} | {:>7} | {:>13} | {:>12} "
      "| {:>9} | {} |\n",
      "rank", "graph", "moe", "hand-off", "threads", "GPU experts", "GPU routing", gpu_header,
      "cpu GiB", "prefill tok/s", "decode tok/s", "request s",
      native_files ? "command" : "placement");
  std::cout << "| ---: | ----- | ------- | --------- | ------: | ------------: | ----------: | "
               "-------: | ------: | ------------: | -----------: | --------: | --- |\n";
  auto row = [&](const std::string& rank, const Candidate& c, const std::string& last) {
    const search::EngineSettings& s = c.settings;
    std::cout << fmt::format(
        "| {:>4} | {:<5} | {:<7} | {:<9} | {:>7} | {:>13} | {:>11} | {:>8} | {:>7} | {:>13.1f} | "
        "{:>12.2f} | {:>9.2f} | {} |\n",
        rank, s.gpu ? (s.cuda_graph ? "on" : "off") : "-",
        !s.gpu                       ? std::string("cpu")
        : s.pcie_assist_permille > 0 ? std::string(moe_kernel_name(s.kernel)) + "+pcie " +
                                           pcie_assist_text(s.pcie_assist_permille)
                                     : std::string(moe_kernel_name(s.kernel)),
        s.gpu && s.cuda_graph ? cpu_handoff_name(s.handoff) : "-", s.cpu_threads,
        fmt::format("{}/{}", c.pred.gpu_experts, total_experts), s.gpu ? pct(c.pred.gpu_mass) : "-",
        gpu_mem(c), mem_of(c, "cpu"), c.pred.prefill_tok_s, c.pred.decode_tok_s, c.pred.request_s,
        last);
  };
  for (size_t i = 0; i < res.ranked.size(); ++i) {
    std::string mark = std::to_string(i + 1);
    row(mark, res.ranked[i], native_files ? command(files[i]) : res.ranked[i].label);
  }
  for (size_t i = 0; i < res.baselines.size(); ++i) {
    row("base", res.baselines[i],
        native_files ? command(base_files[i]) + "  (" + res.baselines[i].label.substr(10) + ")"
                     : res.baselines[i].label);
  }
  std::cout << "\n";
  if (best != nullptr) {
    std::cout << fmt::format("# best (graph on): rank {}: {}\n", res.best_graph + 1, best->label);
  }
  if (res.best_nograph >= 0) {
    std::cout << fmt::format("# best (graph off): rank {}: {}\n", res.best_nograph + 1,
                             res.ranked[size_t(res.best_nograph)].label);
  }
  if (best != nullptr) {
    for (const Candidate& b : res.baselines) {
      const double gain = b.pred.request_s / best->pred.request_s - 1;
      std::cout << fmt::format(
          "# vs {}: {:.2f} s per request, the best is {}\n", b.label.substr(10), b.pred.request_s,
          gain > 0.01 ? fmt::format("{:.1f} % faster", 100 * gain)
                      : std::string("no better (the baseline is as good: keep it)"));
    }
  }
  for (const auto& c : res.split_vs_even) {
    auto layers = [](const std::vector<int64_t>& n) {
      std::string s;
      for (int64_t x : n) s += (s.empty() ? "" : "/") + std::to_string(x);
      return s;
    };
    if (c.even_request_s > 0) {
      std::cout << fmt::format(
          "# {} GPUs, {}: searched split (layers {}) {:.2f} s per request vs even split (layers "
          "{}) {:.2f} s: {}\n",
          c.gpus, c.settings, layers(c.layers_per_gpu), c.split_request_s,
          layers(c.even_layers_per_gpu), c.even_request_s,
          c.split_request_s < c.even_request_s * (1 - 1e-3)
              ? fmt::format("{:.1f} % faster", 100 * (c.even_request_s / c.split_request_s - 1))
              : std::string("the even split is as good (within 0.1 %)"));
    } else {
      std::cout << fmt::format(
          "# {} GPUs, {}: searched split (layers {}) {:.2f} s per request; the even split "
          "(layers {}) does not fit\n",
          c.gpus, c.settings, layers(c.layers_per_gpu), c.split_request_s,
          layers(c.even_layers_per_gpu));
    }
  }
  if (!rounding_line.empty()) std::cout << rounding_line << "\n";
  if (native_files) {
    std::cout << fmt::format("# wrote {} and {} (other candidates in {})\n", lay.best, lay.nograph,
                             lay.folder);
  } else if (f.emit == "ktransformers") {
    std::cout << fmt::format(
        "# wrote {}: python -m ktransformers.local_chat --gguf_path <model folder> "
        "--optimize_config_path {} --cpu_infer {}{}\n",
        f.output, f.output, whole->settings.cpu_threads,
        std::any_of(whole->gpu_counts.begin(), whole->gpu_counts.end(),
                    [](int64_t n) { return n > 0; })
            ? " --use_cuda_graph=False"
            : "");
  } else if (f.emit == "llama-cpp") {
    std::set<std::string> devs;
    for (const LayerPlacement& lp : whole->placement.layers) devs.insert(lp.attention.to_string());
    if (devs.size() > 1 || (devs.size() == 1 && *devs.begin() != "cuda:0")) {
      std::cout << fmt::format(
          "# wrote {}: llama-server -m <model.gguf> -ngl 999 -t {} --split-mode layer "
          "--tensor-split \"$(sed -n 2p {})\" -ot \"$(sed -n 1p {})\"\n",
          f.output, whole->settings.cpu_threads, f.output, f.output);
    } else {
      std::cout << fmt::format(
          "# wrote {}: llama-server -m <model.gguf> -ngl 999 -t {} -ot \"$(cat {})\"\n", f.output,
          whole->settings.cpu_threads, f.output);
    }
  } else {
    std::cout
        << "# add -o best.yaml to write these placements (then: ktune run --config best.yaml)\n";
  }
}

}  // namespace

void add_search_command(CLI::App& app) {
  auto f = std::make_shared<SearchFlags>();
  auto* sub = app.add_subcommand(
      "search",
      "Search the fastest expert placement for a workload from a profile (no GPU needed here).\n"
      "Example: ktune search --profile profiles/h100-16core-handmade.json --model "
      "synth:qwen3-235b-a22b:q4_0 -o best.yaml\n"
      "Writes best.yaml (CUDA graph on) and best-nograph.yaml with predicted tok/s and memory;\n"
      "--emit ktransformers|llama-cpp -o FILE exports a whole-layer rounding instead.");
  sub->add_option("--profile", f->profile,
                  "profile.json from `ktune profile`, or the name of one in profiles/\n"
                  "(e.g. h100-16core-handmade; also looked up in $KTUNE_PROFILES)")
      ->required();
  sub->add_option("--router-stats", f->router_stats,
                  "Another profile whose router statistics to use (a `ktune profile --model M`\n"
                  "run of this model; --profile then only describes the machine)");
  sub->add_option("--calibrate", f->calibrate,
                  "A `ktune profile --model M --experts-on-gpu 0` run of this machine: its CPU\n"
                  "experts' measured bandwidth scales --profile's CpuMoe curve (the engine's\n"
                  "hand-off between GPU layers costs what a back-to-back probe does not)");
  sub->add_option("-m,--model", f->model, kModelHelp)->required();
  sub->add_option("--gpu-mem", f->gpu_mem,
                  "GPU budgets: 70GiB (every GPU) or cuda:0=70GiB (default: the profile's GPU "
                  "memory less 256 MiB)");
  sub->add_option("--cpu-mem", f->cpu_mem,
                  "Host budget, e.g. 100GiB (default: the profile's MemAvailable less 1 GiB)");
  sub->add_option("--workload", f->workload,
                  "chat (default: a chat-like mix) or prompt=2048,gen=256[,context=8192]; several\n"
                  "requests joined by ';' with weight=W")
      ->capture_default_str();
  sub->add_option("--assume", f->assume,
                  "Cost-model numbers over the profile's, key=value,... (see docs/search.md):\n"
                  "launch_eager_us, host_node_us, flag_handoff_us, gpu_prefill_gflop_s, ...");
  sub->add_option("--top", f->top, "Candidates in the table")->capture_default_str();
  sub->add_option("--verify", f->verify,
                  "Run the top N on this machine's engine (model loaded once) and choose by "
                  "measured time")
      ->capture_default_str();
  sub->add_option("-r,--repetitions", f->reps, "Timed repetitions per --verify run")
      ->capture_default_str();
  sub->add_flag("--json", f->json, "Print the whole plan as one JSON document");
  sub->add_option(
         "--emit", f->emit,
         "native (placement YAMLs) | ktransformers (optimize rules) | llama-cpp (-ot list)")
      ->capture_default_str();
  sub->add_option("-o,--output", f->output,
                  "Output: best.yaml (native: best-nograph.yaml and best.candidates/ beside it), "
                  "or the export's file");
  sub->add_option("--solver", f->solver, "auto | greedy | dp | exhaustive (for comparisons)")
      ->capture_default_str();
  sub->add_option("--predict", f->predict,
                  "Price these placement YAMLs with the cost model instead of searching\n"
                  "(e.g. to compare with `ktune run --config` on the same files)")
      ->delimiter(',');
  sub->callback([f] { run_search_command(*f); });
}

}  // namespace ktune::cli
