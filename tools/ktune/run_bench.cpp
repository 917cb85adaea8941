// `ktune run`: llama-bench-like benchmark of the engine on a model: prefill (pp) and decode (tg)
// tok/s as mean ± stddev over repetitions, with a header that says what was measured, and
// decode's ratio to the memory-bound limit (bytes read per token ÷ measured DRAM bandwidth).
// Placement runs (see run_bench.h) add the placement summary per configuration.
#include "run_bench.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "bench_stats.h"
#include "cli.h"
#include "ktune/engine/build_info.h"
#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_info.h"
#include "ktune/engine/gpu_stages.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/interrupt.h"
#include "ktune/engine/numa.h"
#include "ktune/engine/synthetic.h"
#include "ktune/engine/thread_pool.h"
#include "model_arg.h"
#include "model_tokenizer.h"
#include "run_bench_gpu.h"
#include "search/drift.h"

namespace ktune::cli {
namespace {

// "on,off" -> {"on", "off"}; "" -> {""} (the flag was not given: one variant, no override).
std::vector<std::string> split_list(const std::string& text, const char* flag) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    const size_t comma = text.find(',', start);
    out.push_back(
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (out.size() > 1) {
    for (const std::string& v : out) {
      if (v.empty()) throw_usage(flag, "empty value in the list `" + text + "`", "e.g. on,off");
    }
  }
  return out;
}

struct RunResult {
  int threads = 0;
  int64_t batch = 1;    // sequences decoded together in the tg rows
  Stat prefill;         // tok/s
  Stat decode;          // tok/s, all sequences of the batch together
  Stat decode_per_seq;  // tok/s of one sequence (= decode when the batch is 1)
  int reps_done = 0;    // timed repetitions completed (< reps after Ctrl-C)
};

// Ctrl-C / SIGTERM during the measurements (interrupt.h): the repetitions completed so far are
// printed, marked partial, and the command then exits 128 + signal.
struct PartialInfo {
  int signal = 0;  // 0: the run was complete
  int reps_done = 0;
  int reps_planned = 0;
};

constexpr const char* kPartialFix = "partial results above are marked partial";

PartialInfo partial_info(int reps_done, int reps_planned) {
  return {interrupt_signal(), reps_done, reps_planned};
}

std::string partial_line(const PartialInfo& p) {
  return fmt::format("# partial: interrupted by {} after {} of {} repetitions\n",
                     signal_name(p.signal), p.reps_done, p.reps_planned);
}

// The header line that states the DRAM probe and the memory-bound decode limit it implies.
std::string memory_line(const BandwidthResult& bw, double bytes_tok, double limit_tok_s,
                        const char* suffix) {
  return fmt::format(
      "# memory: DRAM read {:.1f} GB/s ({} threads, {} buffer); decode reads {} per token => "
      "memory-bound limit {:.1f} tok/s{}\n",
      bw.gb_per_s, bw.threads, format_bytes(static_cast<double>(bw.bytes)), format_bytes(bytes_tok),
      limit_tok_s, suffix);
}

void add_partial_json(nlohmann::json& doc, const PartialInfo& p) {
  doc["partial"] = p.signal != 0;
  if (p.signal != 0) {
    doc["interrupted_by"] = signal_name(p.signal);
    doc["repetitions_done"] = p.reps_done;
    doc["repetitions_planned"] = p.reps_planned;
  }
}

// Before any measurement: a stop leaves nothing to report.
void stop_if_interrupted_before_measuring() { throw_if_interrupted("nothing was measured yet"); }

// Deterministic pseudo-random prompt tokens (benchmarks must not depend on a tokenizer).
std::vector<int32_t> bench_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return t;
}

RunResult bench_one(const ModelWeights& model, const RunOptions& opt, int threads,
                    int64_t max_context) {
  CpuEngineOptions eo;
  eo.threads = threads;
  eo.max_context = max_context;
  eo.max_batch = std::min<int64_t>(std::max<int64_t>(opt.prompt, 1), 512);
  eo.max_sequences = opt.batch;
  CpuEngine engine(model, eo);
  const int64_t V = model.cfg.vocab;
  const auto prompt = bench_tokens(std::max<int64_t>(opt.prompt, 1), V, opt.seed);
  // --batch B: the sequences start from different tokens, so they route differently.
  const auto starts = bench_tokens(opt.batch, V, opt.seed + 1);
  std::vector<float> logits;
  std::vector<double> pp, tg;
  int reps_done = 0;
  // Ctrl-C is polled between repetitions, after prefill and between decode tokens; a
  // repetition cut short is dropped whole (its pp sample too).
  for (int rep = 0; rep <= opt.reps && !interrupted(); ++rep) {  // rep 0 warms up caches
    double pp_rate = 0, tg_rate = 0;
    if (opt.prompt > 0) {
      engine.reset();
      const double t0 = now_seconds();
      engine.prefill(prompt.data(), opt.prompt, &logits, false);
      const double dt = now_seconds() - t0;
      pp_rate = static_cast<double>(opt.prompt) / dt;
      if (interrupted()) break;
    }
    if (opt.gen > 0 && opt.batch > 1) {
      // B sequences from an empty context, one batched step per token, greedy; the rate counts
      // the tokens of all sequences.
      engine.reset();
      std::vector<int32_t> toks = starts;
      const double t0 = now_seconds();
      for (int64_t i = 0; i < opt.gen && !interrupted(); ++i) {
        engine.decode_batch(toks.data(), opt.batch, &logits);
        for (int64_t b = 0; b < opt.batch; ++b) {
          toks[static_cast<size_t>(b)] = CpuEngine::argmax(logits.data() + b * V, V);
        }
      }
      const double dt = now_seconds() - t0;
      if (interrupted()) break;
      tg_rate = static_cast<double>(opt.gen * opt.batch) / dt;
    } else if (opt.gen > 0) {
      // tg as llama-bench measures it: from an empty context, one token at a time, greedy.
      engine.reset();
      int32_t tok = prompt[0];
      const double t0 = now_seconds();
      for (int64_t i = 0; i < opt.gen && !interrupted(); ++i) {
        engine.decode(tok, &logits);
        tok = CpuEngine::argmax(logits.data(), V);
      }
      const double dt = now_seconds() - t0;
      if (interrupted()) break;
      tg_rate = static_cast<double>(opt.gen) / dt;
    }
    if (rep > 0) {
      if (opt.prompt > 0) pp.push_back(pp_rate);
      if (opt.gen > 0) tg.push_back(tg_rate);
      reps_done = rep;
    }
    // Progress only on a terminal: a log file should not collect carriage-return lines.
    if (!opt.json && rep > 0 && isatty(STDERR_FILENO)) {
      std::fprintf(stderr, "\rktune: threads %d: repetition %d/%d", threads, rep, opt.reps);
    }
  }
  if (!opt.json && isatty(STDERR_FILENO)) std::fprintf(stderr, "\r%60s\r", "");
  RunResult r;
  r.threads = engine.threads();
  r.prefill = Stat::of(pp);
  r.decode = Stat::of(tg);
  for (double& x : tg) x /= static_cast<double>(opt.batch);
  r.decode_per_seq = Stat::of(tg);
  r.reps_done = reps_done;
  r.batch = opt.batch;
  return r;
}

// Bytes one decode step of opt.batch tokens reads: bytes_per_token_decode with each MoE layer's
// top-k experts replaced by the expected distinct experts of the batch (uniform routing).
double bytes_per_step(const ModelWeights& model, int64_t batch) {
  double total = static_cast<double>(model.bytes_per_token_decode());
  if (batch <= 1) return total;
  const WeightBytes wb = weight_bytes(model);
  const ModelConfig& c = model.cfg;
  const double extra = expected_distinct_experts(c.n_experts, c.n_experts_used, batch) -
                       static_cast<double>(c.n_experts_used);
  for (int64_t e : wb.expert) total += extra * static_cast<double>(e);
  return total;
}

// "# batch: 4, 16 sequences decoded together (...); a step reads ~3.6, 11.1 of 128 experts ..."
// for the batches > 1 of the run ("" when there are none).
std::string batch_line(const ModelConfig& c, const std::vector<int64_t>& batches) {
  std::string sizes, reads;
  for (int64_t b : batches) {
    if (b <= 1) continue;
    sizes += (sizes.empty() ? "" : ", ") + std::to_string(b);
    reads += (reads.empty() ? "" : ", ") +
             fmt::format("{:.1f}", expected_distinct_experts(c.n_experts, c.n_experts_used, b));
  }
  if (sizes.empty()) return "";
  return fmt::format(
      "# batch: {} sequences decoded together (tg rows: all sequences' tokens per second, and "
      "per sequence); a step reads ~{} of {} experts per layer (uniform routing)\n",
      sizes, reads, c.n_experts);
}

std::string tg_label(int64_t gen, int64_t batch, bool per_seq) {
  if (batch <= 1) return fmt::format("tg{}", gen);
  return fmt::format("tg{} x{}{}", gen, batch, per_seq ? " /seq" : "");
}

// The memory-bound decode limit of a step of `batch` tokens for a memory read at gb_s: batch
// tokens per bytes_per_step (0 when gb_s is unknown).
double batch_limit_tok_s(const ModelWeights& model, int64_t batch, double gb_s) {
  return gb_s > 0 ? static_cast<double>(batch) * gb_s * 1e9 / bytes_per_step(model, batch) : 0.0;
}

// Checks shared by both paths; returns the thread list (default: one per physical core).
// The CPU threads of a run that --threads does not size: the placement's runtime.cpu_threads,
// else the engine's default (every physical core for the CPU engine, one fewer for a hybrid
// one: thread_pool.h).
int default_threads(const Placement& p, EngineKind engine) {
  if (p.runtime.cpu_threads > 0) return p.runtime.cpu_threads;
  return engine == EngineKind::Hybrid ? hybrid_cpu_threads_default() : physical_core_count();
}

// --threads, else the run's default: one benchmark row per entry.
std::vector<int> thread_rows(const RunOptions& opt, const Placement& p, EngineKind engine) {
  return opt.threads.empty() ? std::vector<int>{default_threads(p, engine)} : opt.threads;
}

std::vector<int> check_common(const RunOptions& opt) {
  if (opt.gen < 0) {
    throw_usage("-n", fmt::format("{} is negative", opt.gen), "give -n N with N >= 0 (0 skips)");
  }
  if (opt.prompt < 0 || (opt.prompt == 0 && opt.gen == 0)) {
    throw_usage("-p/-n", "nothing to measure", "give -p N (prefill tokens) and/or -n N (decode)");
  }
  if (opt.reps < 1 || opt.reps > 1000) throw_usage("-r", "must be 1..1000", "e.g. -r 5");
  for (int64_t b : batch_list(opt)) {
    if (b < 1 || b > kMaxBatch) {
      throw_usage("--batch", fmt::format("{} is not 1..{}", b, kMaxBatch),
                  "e.g. --batch 8 (sequences decoded together), or a list --batch 1,4,16");
    }
  }
  const int cores = physical_core_count();
  for (int t : opt.threads) {
    if (t < 1 || t > 4096) {
      throw_usage("--threads", fmt::format("{} is not a thread count", t),
                  fmt::format("use 1..{} (this machine has {} physical cores)", cores, cores));
    }
  }
  return opt.threads.empty() ? std::vector<int>{cores} : opt.threads;
}

void check_context(const ModelConfig& cfg, const RunOptions& opt) {
  const int64_t ctx_needed = opt.prompt + opt.gen + 1;
  if (cfg.context_length > 0 && ctx_needed > cfg.context_length) {
    throw_usage(
        "-p/-n",
        fmt::format("{} tokens exceed the model's context of {}", ctx_needed, cfg.context_length),
        "use smaller -p/-n");
  }
}

std::string model_line(const ModelWeights& model) {
  const ModelConfig& c = model.cfg;
  return fmt::format("# model: {} ({}, {} layers, {} experts top-{}, {} params, {} active, {})\n",
                     model.source, c.arch, c.n_layers, c.n_experts, c.n_experts_used,
                     format_count(static_cast<double>(c.params_total())),
                     format_count(static_cast<double>(c.params_active_per_token())),
                     format_bytes(static_cast<double>(model.weight_bytes())));
}

// The plain --model run: the CpuEngine, one row per thread count and test.
void run_plain(const RunOptions& opt) {
  std::vector<int> thread_list = check_common(opt);
  const int cores = physical_core_count();
  ModelWeights model = load_model_for_cli(opt.model, opt.json);
  check_context(model.cfg, opt);
  const int64_t max_context = std::max<int64_t>(opt.prompt, 1) + opt.gen + 1;

  BandwidthResult bw;
  if (opt.probe) {
    ThreadPool pool(thread_list.back());
    bw = measure_read_bandwidth(pool, default_probe_bytes(), 3);
  }
  stop_if_interrupted_before_measuring();
  // One result per thread count and batch; prefill is measured with the first batch only.
  const std::vector<int64_t> batches = batch_list(opt);
  std::vector<RunResult> results;
  int reps_done = 0;
  for (int t : thread_list) {
    for (size_t i = 0; i < batches.size() && (i == 0 || opt.gen > 0); ++i) {
      if (interrupted()) break;
      RunOptions ob = opt;
      ob.batch = batches[i];
      if (i > 0) ob.prompt = 0;
      results.push_back(bench_one(model, ob, t, max_context));
      reps_done += results.back().reps_done;
    }
  }
  const int planned_rows =
      static_cast<int>(thread_list.size() * (opt.gen > 0 ? batches.size() : 1));
  const PartialInfo partial = partial_info(reps_done, opt.reps * planned_rows);

  // With --batch B: bytes of one step of B tokens, and B tokens per step.
  const double bytes_tok = bytes_per_step(model, batches.front());
  const double limit_tok_s = batch_limit_tok_s(model, batches.front(), bw.gb_per_s);
  auto row_limit = [&](const RunResult& r) {
    return batch_limit_tok_s(model, r.batch, bw.gb_per_s);
  };
  const std::string isa = cpu::isa_name(cpu::detect_isa());
  const bool any_batch =
      std::any_of(batches.begin(), batches.end(), [](int64_t b) { return b > 1; });

  if (opt.json) {
    nlohmann::json doc = report_header(model, results.front().threads, isa);
    doc["prompt_tokens"] = opt.prompt;
    doc["gen_tokens"] = opt.gen;
    doc["repetitions"] = opt.reps;
    doc["dram_read_gb_s"] = bw.gb_per_s;
    doc["memory_bound_decode_tok_s"] = limit_tok_s;
    doc["prefill_tok_s"] = results.front().prefill.to_json();
    doc["decode_tok_s"] = results.front().decode.to_json();
    doc["batch"] = results.front().batch;
    doc["batches"] = batches;
    doc["decode_tok_s_per_sequence"] = results.front().decode_per_seq.to_json();
    doc["decode_fraction_of_limit"] =
        limit_tok_s > 0 ? results.front().decode.mean / limit_tok_s : 0.0;
    add_partial_json(doc, partial);
    nlohmann::json runs = nlohmann::json::array();
    for (const auto& r : results) {
      const double lim = row_limit(r);
      runs.push_back({{"threads", r.threads},
                      {"batch", r.batch},
                      {"repetitions_done", r.reps_done},
                      {"prefill_tok_s", r.prefill.to_json()},
                      {"decode_tok_s", r.decode.to_json()},
                      {"decode_tok_s_per_sequence", r.decode_per_seq.to_json()},
                      {"memory_bound_decode_tok_s", lim},
                      {"decode_fraction_of_limit", lim > 0 ? r.decode.mean / lim : 0.0}});
    }
    doc["runs"] = runs;
    std::cout << doc.dump(2) << "\n";
    if (partial.signal != 0) throw Interrupted(partial.signal, kPartialFix);
    return;
  }

  std::cout << fmt::format("# ktune run  commit {}  (ktune {})\n", build_commit(), build_version());
  std::cout << fmt::format("# cpu: {}, {} physical cores, kernels {}\n", cpu_model_name(), cores,
                           isa);
  std::cout << model_line(model);
  if (opt.probe) {
    std::cout << memory_line(
        bw, bytes_tok, limit_tok_s,
        batches.front() > 1 ? " (per step of the batch; limit for all sequences)" : "");
  }
  std::cout << batch_line(model.cfg, batches);
  std::cout << fmt::format("# repetitions: {} (after 1 warm-up), mean ± stddev\n", opt.reps);
  if (partial.signal != 0) std::cout << partial_line(partial);
  std::cout << "\n";
  // The test column widens for batch labels ("tg128 x32 /seq").
  const int tw = any_batch ? 14 : 7;
  auto test_col = [&](const std::string& t) { return fmt::format("{:>{}}", t, tw); };
  std::cout << fmt::format("| {:<8} | {:>7} | {} | {:>20} | {:>12} |\n", "quant", "threads",
                           test_col("test"), "tok/s", "% of limit");
  std::cout << "| -------- | ------: | " << std::string(tw - 1, '-')
            << ": | -------------------: | -----------: |\n";
  for (const auto& r : results) {
    if (r.reps_done == 0) continue;  // interrupted before its first timed repetition
    if (!r.prefill.samples.empty()) {
      std::cout << fmt::format("| {:<8} | {:>7} | {} | {:>20} | {:>12} |\n",
                               quant_name(model.quant), r.threads, test_col(fmt::format("pp{}", opt.prompt)),
                               fmt::format("{:.2f} ± {:.2f}", r.prefill.mean, r.prefill.stddev),
                               "");
    }
    if (opt.gen > 0) {
      const double lim = row_limit(r);
      const std::string pct =
          lim > 0 ? fmt::format("{:.1f} %", 100.0 * r.decode.mean / lim) : "n/a";
      std::cout << fmt::format("| {:<8} | {:>7} | {} | {:>20} | {:>12} |\n",
                               quant_name(model.quant), r.threads,
                               test_col(tg_label(opt.gen, r.batch, false)),
                               fmt::format("{:.2f} ± {:.2f}", r.decode.mean, r.decode.stddev), pct);
      if (r.batch > 1) {
        std::cout << fmt::format(
            "| {:<8} | {:>7} | {} | {:>20} | {:>12} |\n", quant_name(model.quant), r.threads,
            test_col(tg_label(opt.gen, r.batch, true)),
            fmt::format("{:.2f} ± {:.2f}", r.decode_per_seq.mean, r.decode_per_seq.stddev), "");
      }
    }
  }
  if (partial.signal != 0) {
    std::cout.flush();
    throw Interrupted(partial.signal, kPartialFix);
  }
}

// ---- placement runs ----

// The model's shape and bytes, known before its weights are loaded: synth: specs from the
// compiled-in preset (nothing generated); files are opened (GGUF: mmap, no tensor data read) and
// kept, so the sweep does not open them twice.
struct ModelShape {
  std::string spec;
  ModelConfig cfg;
  WeightBytes bytes;
  std::optional<ModelWeights> opened;
};

ModelShape model_shape(const std::string& spec, bool quiet) {
  ModelShape s;
  s.spec = spec;
  if (spec.rfind("synth:", 0) == 0) {
    const SynthOptions so = parse_synth_spec(spec);
    const ModelConfig* c = find_preset(so.preset);
    if (c != nullptr) {
      s.cfg = *c;
      // One matrix type, or a mix's types per tensor (the shape's own sizes; nothing built).
      s.bytes = so.mix == QuantMix::None ? weight_bytes(s.cfg, so.quant, so.quant)
                                         : weight_bytes(synthetic_model_shape(so));
      return s;
    }
  }
  s.opened = load_model_for_cli(spec, quiet);
  s.cfg = s.opened->cfg;
  s.bytes = weight_bytes(*s.opened);
  return s;
}

struct PlannedRun {
  std::string label;
  Placement placement;
  MemoryPlan plan;
  EngineKind engine = EngineKind::Cpu;
  PlacementSummary summary;
  int64_t context = 0;  // KV cache length the engine gets (= the plan's)
  int64_t shape_vocab = 1;  // the model's vocabulary (first tokens of batched rows)
};

// The GpuEngine benchmark's settings for a planned GPU or hybrid run; cpu_threads for the CPU
// experts of a hybrid placement (0: the placement's runtime.cpu_threads, else physical cores).
GpuBenchSettings gpu_bench_settings(const PlannedRun& r, const RunOptions& opt, int cpu_threads,
                                    bool progress) {
  GpuBenchSettings s;
  s.max_context = r.context;
  s.cuda_graph = r.summary.cuda_graph;
  s.handoff_host_node = r.placement.runtime.cpu_handoff == CpuHandoff::HostNode;
  s.pcie_assist_permille = r.placement.runtime.pcie_assist_permille;
  if (r.engine == EngineKind::Hybrid) {
    s.expert_on_gpu = experts_on_gpu_map(r.placement);
    s.cpu_threads = cpu_threads > 0 ? cpu_threads : r.placement.runtime.cpu_threads;
  }
  // Any GPU other than cuda:0 (several, or one other): each layer's device for the layer split.
  const std::vector<int> devs = layer_devices(r.placement);
  if (std::any_of(devs.begin(), devs.end(), [](int d) { return d != 0; })) s.layer_device = devs;
  s.gpu_transport = gpu_transport_name(r.placement.runtime.gpu_transport);
  s.fused = r.placement.runtime.moe_kernel == MoeKernel::Fused;
  s.prompt = opt.prompt;
  s.gen = opt.gen;
  s.batches = batch_list(opt);
  const int64_t most = *std::max_element(s.batches.begin(), s.batches.end());
  // As the CPU engine's batched rows: sequence b starts from token b of this list.
  s.batch_starts = bench_tokens(most, r.shape_vocab, opt.seed + 1);
  s.reps = opt.reps;
  s.progress = progress;
  s.label = r.label;
  s.count_experts = search::wants_drift_check(r.placement);
  return s;
}

// A placement searched on measured routing: warn when this run's routing moved away from it.
void warn_on_drift(const PlannedRun& r, const GpuBenchResult& g) {
  const std::string w = search::drift_warning(r.placement, g.expert_counts);
  if (!w.empty()) std::fprintf(stderr, "ktune: warning: %s: %s\n", r.label.c_str(), w.c_str());
}

// Step 2 for one placement: resolve against the model, apply the overrides, size the KV cache
// (the placement's context, or what -p/-n need when that is more), plan, check budgets and
// devices, choose the engine. Nothing is loaded.
PlannedRun plan_run(Placement placement, const std::string& label, const ModelShape& shape,
                    const RuntimeOverrides& ov, const Budgets& budgets, int64_t needed,
                    int64_t batch = 1) {
  PlannedRun r;
  r.label = label;
  r.placement = std::move(placement);
  resolve_placement(r.placement, shape.cfg);
  apply_runtime_overrides(r.placement, ov);
  r.context = std::max(r.placement.runtime.context, needed);
  r.placement.runtime.context = r.context;
  r.shape_vocab = shape.cfg.vocab;
  // The KV cache is planned per sequence (runtime.batch x context positions per layer).
  if (batch > 1) r.placement.runtime.batch = batch;
  if (r.placement.runtime.batch > 1) {
    // The GPU engine decodes several sequences on one GPU (cuda:0); refused before anything
    // else for a layer split.
    const EngineKind k = choose_engine(r.placement, r.label);
    const std::vector<int> devs = layer_devices(r.placement);
    if (k != EngineKind::Cpu &&
        std::any_of(devs.begin(), devs.end(), [](int d) { return d != 0; })) {
      throw Error(r.label,
                  fmt::format("batch {}: the {} engine decodes several sequences on cuda:0 "
                              "alone for now, not on a layer split over GPUs",
                              r.placement.runtime.batch, engine_kind_name(k)),
                  "use --batch 1 (runtime.batch: 1) with this placement, or one GPU (cuda:0)");
    }
  }
  r.plan = plan_memory(shape.cfg, shape.bytes, r.placement, budgets);
  check_fits(r.plan);
  check_gpus_present(r.placement);
  check_numa_nodes_present(r.placement, host_numa_topology());
  r.engine = choose_engine(r.placement, r.label);
  r.summary = summarize_placement(r.label, r.placement, r.plan, r.engine);
  return r;
}

struct ConfigResult {
  size_t placement = 0;  // index into the planned runs
  int threads = 0;       // 0 for the GpuEngine
  Stat prefill, decode;  // decode: all sequences of the batch together
  std::string engine_desc;
  int reps_done = 0;
  double device_gb_s = 0.0;  // GpuEngine rows: cuda:0's measured bandwidth (0: unknown)
  int64_t batch = 1;         // sequences decoded together
  Stat decode_per_seq;       // tok/s of one sequence
};

std::string layer_signature(const LayerPlacement& lp) {
  std::map<Device, int64_t> n;
  for (const Device& d : lp.experts) ++n[d];
  std::string s = "attention " + lp.attention.to_string() + ", experts ";
  if (n.size() == 1) return s + n.begin()->first.to_string();
  bool first = true;
  for (const auto& [d, c] : n) {
    s += (first ? "" : " + ") + d.to_string() + " " + std::to_string(c);
    first = false;
  }
  return s;
}

nlohmann::json summary_json(const PlacementSummary& s) {
  nlohmann::json experts = nlohmann::json::object(), mem = nlohmann::json::object(),
                 budget = nlohmann::json::object();
  for (const auto& [d, n] : s.experts) experts[d] = n;
  for (const auto& [d, b] : s.bytes) mem[d] = static_cast<double>(b) / kGiB;
  for (const auto& [d, b] : s.budget) {
    budget[d] = b < 0 ? nlohmann::json(nullptr) : nlohmann::json(static_cast<double>(b) / kGiB);
  }
  nlohmann::json j = {{"label", s.label},
          {"engine", engine_kind_name(s.engine)},
          {"experts", experts},
          {"memory_gib", mem},
          {"budget_gib", budget},
          {"cuda_graph", s.cuda_graph},
          {"moe_kernel", moe_kernel_name(s.moe_kernel)},
          {"cpu_threads", s.cpu_threads},
          {"context", s.context}};
  if (s.cpu_handoff) {  // hybrid placements
    j["cpu_handoff"] = cpu_handoff_name(*s.cpu_handoff);
    j["pcie_assist"] = s.pcie_assist_permille / 1000.0;
  }
  if (s.gpu_transport) {
    j["gpu_transport"] = gpu_transport_name(*s.gpu_transport);
    j["gpu_stages"] = s.gpu_stages;
  }
  return j;
}

// Steps 1 and 2 of a placement run: every placement of the command line (files, or the quick
// flags) x every combination of the listed runtime settings, resolved, planned, checked against
// budgets and devices, its engine chosen -- all before any weights are loaded.
struct PlannedSweep {
  std::string spec;  // the one model of the sweep
  ModelShape shape;
  std::vector<PlannedRun> runs;
};

PlannedSweep plan_sweep(const RunOptions& opt, bool quiet) {
  const bool quick = opt.configs.empty();
  if (!quick && !opt.experts_on_gpu.empty()) {
    throw_usage("--experts-on-gpu", "cannot be combined with --config",
                "put the placement in the YAML, or drop --config");
  }
  if (!quick && !opt.gpus.empty()) {
    throw_usage("--gpus", "cannot be combined with --config",
                "put the layer split in the YAML (attention: cuda:N per layer range), or drop "
                "--config");
  }
  for (int g : opt.gpus) {
    if (g < 1 || g > 1024) {
      throw_usage("--gpus", fmt::format("{} is not a number of GPUs", g),
                  "give how many GPUs to split the layers over, e.g. --gpus 1,2,4");
    }
  }
  for (int64_t n : opt.experts_on_gpu) {
    if (n < 0) {
      throw_usage("--experts-on-gpu", fmt::format("{} is negative", n),
                  "give the number of layers whose experts go on cuda:0 (0 = all on the CPU)");
    }
  }
  // Every combination of the listed runtime settings ("" = the placement's own).
  std::vector<std::pair<RuntimeOverrides, std::string>> variants;
  const auto graphs = split_list(opt.cuda_graph, "--cuda-graph");
  const auto kernels = split_list(opt.moe_kernel, "--moe-kernel");
  const auto handoffs = split_list(opt.cpu_handoff, "--cpu-handoff");
  const auto transports = split_list(opt.gpu_transport, "--gpu-transport");
  const auto assists = split_list(opt.pcie_assist, "--pcie-assist");
  for (const std::string& g : graphs) {
    for (const std::string& k : kernels) {
      for (const std::string& h : handoffs) {
        for (const std::string& t : transports) {
          for (const std::string& a : assists) {
            std::string tag;
            if (graphs.size() > 1) tag += " | graph " + g;
            if (kernels.size() > 1) tag += " | moe " + k;
            if (handoffs.size() > 1) tag += " | handoff " + h;
            if (transports.size() > 1) tag += " | transport " + t;
            if (assists.size() > 1) tag += " | pcie assist " + a;
            variants.emplace_back(parse_runtime_overrides(g, k, h, t, a), tag);
          }
        }
      }
    }
  }
  Budgets budgets = default_budgets();
  if (!opt.gpu_mem.empty()) apply_budget_overrides(budgets, opt.gpu_mem, "--gpu-mem", Device::Cuda);
  if (!opt.cpu_mem.empty()) apply_budget_overrides(budgets, opt.cpu_mem, "--cpu-mem", Device::Cpu);

  // 1. Placements as files say (no model needed) and the one model of the sweep.
  std::vector<Placement> placements;
  std::vector<std::string> labels;
  for (const std::string& path : opt.configs) {
    if (path.empty())
      throw_usage("--config", "empty file name in the list", "e.g. --config a.yaml,b.yaml");
    placements.push_back(load_placement(path));
    labels.push_back(path);
  }
  std::string spec = opt.model;
  if (!quick && !opt.model_given) {
    spec = placements.front().model_resolved;
    for (size_t i = 1; i < placements.size(); ++i) {
      if (placements[i].model_resolved != spec) {
        throw Error(labels[i],
                    "names model " + placements[i].model_resolved + " but " + labels[0] +
                        " names " + spec + " (a sweep loads one model)",
                    "use configs for the same model, or give --model to run them all on one");
      }
    }
  }
  ModelShape shape = model_shape(spec, quiet);
  const ModelConfig& cfg = shape.cfg;
  check_context(cfg, opt);

  // 2. Resolve, apply the overrides, plan, check budgets and devices, choose engines: all
  // before the weights are loaded.
  if (quick && !opt.gpus.empty()) {
    // --gpus N[,...] x --experts-on-gpu K[,...] (no K: every expert on its layer's GPU).
    std::vector<int64_t> ks = opt.experts_on_gpu;
    if (ks.empty()) ks.push_back(cfg.n_layers);
    for (int g : opt.gpus) {
      for (int64_t k : ks) {
        placements.push_back(make_gpu_split(cfg, g, k));
        labels.push_back(opt.experts_on_gpu.empty()
                             ? fmt::format("--gpus {}", g)
                             : fmt::format("--gpus {} --experts-on-gpu {}", g, k));
        placements.back().model_path = spec;
        placements.back().model_resolved = spec;
      }
    }
  } else if (quick) {
    for (int64_t n : opt.experts_on_gpu) {
      if (n > cfg.n_layers) {
        throw_usage("--experts-on-gpu",
                    fmt::format("{} layers, but the model has {}", n, cfg.n_layers),
                    fmt::format("use 0..{}", cfg.n_layers));
      }
      placements.push_back(make_layer_split(cfg, n, Device::cuda(0)));
      labels.push_back(fmt::format("--experts-on-gpu {}", n));
      placements.back().model_path = spec;
      placements.back().model_resolved = spec;
    }
    if (opt.experts_on_gpu.empty()) {
      placements.push_back(make_uniform_placement(cfg, Device::cpu(), Device::cpu()));
      labels.push_back("all on cpu");
    }
    placements.back().model_path = spec;
    placements.back().model_resolved = spec;
  }
  const int64_t needed = std::max<int64_t>(opt.prompt, 1) + opt.gen + 1;
  std::vector<PlannedRun> runs;
  for (size_t i = 0; i < placements.size(); ++i) {
    for (const auto& [ov, tag] : variants) {
      runs.push_back(
          plan_run(placements[i], labels[i] + tag, shape, ov, budgets, needed, opt.batch));
    }
  }
  return PlannedSweep{spec, std::move(shape), std::move(runs)};
}

void run_placements(const RunOptions& opt) {
  std::vector<int> thread_list = check_common(opt);
  PlannedSweep sweep = plan_sweep(opt, opt.json);
  const std::string& spec = sweep.spec;
  ModelShape& shape = sweep.shape;
  const ModelConfig& cfg = shape.cfg;
  std::vector<PlannedRun>& runs = sweep.runs;

  // 3. Load once, run every placement.
  const double t0 = now_seconds();
  ModelWeights model = shape.opened ? std::move(*shape.opened) : load_model_for_cli(spec, opt.json);
  const double load_s = now_seconds() - t0;
  const int model_loads = 1;

  bool any_cpu = false;
  int probe_threads = 1;
  for (const PlannedRun& r : runs) {
    if (r.engine != EngineKind::Cpu) continue;
    any_cpu = true;
    const int t =
        opt.threads.empty() ? default_threads(r.placement, r.engine) : thread_list.back();
    probe_threads = std::max(probe_threads, t);
  }
  BandwidthResult bw;
  if (opt.probe && any_cpu) {
    ThreadPool pool(probe_threads);
    bw = measure_read_bandwidth(pool, default_probe_bytes(), 3);
  }
  const auto prompt = bench_tokens(std::max<int64_t>(opt.prompt, 1), cfg.vocab, opt.seed);
  stop_if_interrupted_before_measuring();
  // One result per placement, thread count and batch (--batch B[,B...]); prefill is measured
  // with the first batch only. The GPU engine runs every batch with one engine (made for the
  // largest); the CPU engine one per batch.
  const std::vector<int64_t> batches = batch_list(opt);
  const size_t batch_rows = opt.gen > 0 ? batches.size() : 1;
  std::vector<ConfigResult> results;
  int planned_rows = 0;
  for (const PlannedRun& r : runs) {
    planned_rows +=
        (r.engine != EngineKind::Gpu && !opt.threads.empty() ? static_cast<int>(opt.threads.size())
                                                             : 1) *
        static_cast<int>(batch_rows);
  }
  // The rows of one GPU benchmark, one per batch.
  auto add_gpu_rows = [&](size_t i, int t, const GpuBenchResult& g) {
    for (size_t b = 0; b < g.batch_rows.size() && b < batch_rows; ++b) {
      ConfigResult c;
      c.placement = i;
      c.threads = t;
      if (b == 0) c.prefill = g.prefill;
      c.decode = g.batch_rows[b].decode;
      c.engine_desc = g.describe;
      c.reps_done = opt.reps;
      c.device_gb_s = g.device_gb_s;
      c.batch = g.batch_rows[b].batch;
      c.decode_per_seq = g.batch_rows[b].decode_per_seq;
      results.push_back(c);
    }
  };
  for (size_t i = 0; i < runs.size() && !interrupted(); ++i) {
    const PlannedRun& r = runs[i];
    if (r.engine == EngineKind::Cpu) {
      for (int t : thread_rows(opt, r.placement, r.engine)) {
        for (size_t b = 0; b < batch_rows; ++b) {
          if (interrupted()) break;
          RunOptions ob = opt;
          ob.batch = batches[b];
          if (b > 0) ob.prompt = 0;
          RunResult rr = bench_one(model, ob, t, r.context);
          ConfigResult c;
          c.placement = i;
          c.threads = rr.threads;
          c.prefill = rr.prefill;
          c.decode = rr.decode;
          c.engine_desc = "cpu";
          c.reps_done = rr.reps_done;
          c.batch = rr.batch;
          c.decode_per_seq = rr.decode_per_seq;
          results.push_back(c);
        }
      }
    } else if (r.engine == EngineKind::Hybrid) {
      // A hybrid row per thread count too: the CPU experts' pool is what --threads sizes.
      for (int t : thread_rows(opt, r.placement, r.engine)) {
        if (interrupted()) break;
        const GpuBenchSettings s = gpu_bench_settings(r, opt, t, !opt.json);
        const GpuBenchResult g = bench_gpu_engine(model, s, prompt);
        warn_on_drift(r, g);
        add_gpu_rows(i, t, g);
      }
    } else {
      const GpuBenchSettings s = gpu_bench_settings(r, opt, 0, !opt.json);
      // The GPU benchmark does not poll Ctrl-C yet: its rows are complete or absent.
      const GpuBenchResult g = bench_gpu_engine(model, s, prompt);
      warn_on_drift(r, g);
      add_gpu_rows(i, 0, g);
    }
  }
  int reps_done = 0;
  for (const ConfigResult& c : results) reps_done += c.reps_done;
  const PartialInfo partial = partial_info(reps_done, opt.reps * planned_rows);
  if (results.empty()) stop_if_interrupted_before_measuring();

  // With --batch B: bytes of one step of B tokens, B tokens per step (per row's batch).
  const double bytes_tok = bytes_per_step(model, batches.front());
  const double limit_tok_s = batch_limit_tok_s(model, batches.front(), bw.gb_per_s);
  const std::string isa = cpu::isa_name(cpu::detect_isa());
  const GpuInfo gpus = query_gpus();
  const bool any_batch =
      std::any_of(batches.begin(), batches.end(), [](int64_t b) { return b > 1; });
  // The memory-bound limit of a row: bytes per step of its batch / the DRAM probe for the
  // CpuEngine, / cuda:0's measured bandwidth for the GpuEngine (every weight on the GPU); none
  // for hybrid rows (two memories at once).
  auto row_limit = [&](const ConfigResult& c) -> double {
    switch (runs[c.placement].engine) {
      case EngineKind::Cpu:
        return batch_limit_tok_s(model, c.batch, bw.gb_per_s);
      case EngineKind::Gpu:
        return batch_limit_tok_s(model, c.batch, c.device_gb_s);
      default:
        return 0.0;
    }
  };
  auto pct_of_limit = [&](const ConfigResult& c) -> double {
    const double lim = row_limit(c);
    return lim > 0 ? c.decode.mean / lim : 0.0;
  };

  if (opt.json) {
    nlohmann::json doc = report_header(model, results.front().threads, isa);
    doc["prompt_tokens"] = opt.prompt;
    doc["gen_tokens"] = opt.gen;
    doc["repetitions"] = opt.reps;
    doc["model_loads"] = model_loads;
    doc["model_load_s"] = load_s;
    doc["gpus"] = nlohmann::json::array();
    for (const GpuDevice& g : gpus.devices) {
      doc["gpus"].push_back({{"device", Device::cuda(g.index).to_string()},
                             {"name", g.name},
                             {"total_bytes", g.total_bytes}});
    }
    if (gpus.devices.empty()) doc["gpu_note"] = gpus.unavailable_reason;
    doc["dram_read_gb_s"] = bw.gb_per_s;
    doc["memory_bound_decode_tok_s"] = limit_tok_s;
    doc["prefill_tok_s"] = results.front().prefill.to_json();
    doc["decode_tok_s"] = results.front().decode.to_json();
    doc["decode_fraction_of_limit"] = pct_of_limit(results.front());
    doc["batch"] = results.front().batch;
    doc["batches"] = batches;
    add_partial_json(doc, partial);
    nlohmann::json pl = nlohmann::json::array();
    for (const PlannedRun& r : runs) pl.push_back(summary_json(r.summary));
    doc["placements"] = pl;
    nlohmann::json out = nlohmann::json::array();
    for (const ConfigResult& c : results) {
      nlohmann::json j = {{"placement", c.placement},
                          {"label", runs[c.placement].label},
                          {"engine", engine_kind_name(runs[c.placement].engine)},
                          {"engine_description", c.engine_desc},
                          {"repetitions_done", c.reps_done},
                          {"prefill_tok_s", c.prefill.to_json()},
                          {"decode_tok_s", c.decode.to_json()},
                          {"decode_fraction_of_limit", pct_of_limit(c)},
                          {"memory_bound_decode_tok_s", row_limit(c)},
                          {"batch", c.batch},
                          {"decode_tok_s_per_sequence", c.decode_per_seq.to_json()}};
      if (runs[c.placement].engine == EngineKind::Gpu) j["device_gb_s"] = c.device_gb_s;
      j["threads"] = c.threads > 0 ? nlohmann::json(c.threads) : nlohmann::json(nullptr);
      out.push_back(j);
    }
    doc["runs"] = out;
    std::cout << doc.dump(2) << "\n";
    if (partial.signal != 0) throw Interrupted(partial.signal, kPartialFix);
    return;
  }

  std::cout << fmt::format("# ktune run  commit {}  (ktune {})\n", build_commit(), build_version());
  std::cout << fmt::format("# cpu: {}, {} physical cores, kernels {}\n", cpu_model_name(),
                           physical_core_count(), isa);
  if (gpus.devices.empty()) {
    std::cout << fmt::format("# gpu: none ({})\n", gpus.unavailable_reason);
  } else {
    for (const GpuDevice& g : gpus.devices) {
      std::cout << fmt::format("# gpu: cuda:{} {}, {}, sm_{}{}, driver {}\n", g.index, g.name,
                               format_bytes(static_cast<double>(g.total_bytes)), g.sm_major,
                               g.sm_minor, gpus.driver_version);
    }
  }
  std::cout << model_line(model);
  std::cout << fmt::format("# model loaded once in {:.1f} s for {} placement{}\n", load_s,
                           runs.size(), runs.size() == 1 ? "" : "s");
  std::cout << batch_line(cfg, batches);
  if (opt.probe && any_cpu) {
    std::cout << memory_line(bw, bytes_tok, limit_tok_s, " (cpu engine)");
  }
  for (const ConfigResult& c : results) {
    if (runs[c.placement].engine != EngineKind::Gpu || c.device_gb_s <= 0) continue;
    std::cout << fmt::format(
        "# memory: cuda:0 device-to-device copy {:.0f} GB/s (read + write); decode reads {} per "
        "{} => memory-bound limit {:.1f} tok/s (gpu engine{})\n",
        c.device_gb_s, format_bytes(bytes_per_step(model, c.batch)),
        c.batch > 1 ? fmt::format("step of {} tokens", c.batch) : std::string("token"),
        row_limit(c), any_batch ? "; each batch row has its own limit" : "");
    break;
  }
  std::cout << fmt::format("# repetitions: {} (after 1 warm-up), mean ± stddev\n", opt.reps);
  if (partial.signal != 0) std::cout << partial_line(partial);
  for (size_t i = 0; i < runs.size(); ++i) {
    std::cout << fmt::format("# placement {}: {}: {}\n", i + 1, runs[i].label,
                             runs[i].summary.line());
  }
  std::cout << "\n";
  const int tw = any_batch ? 14 : 7;
  auto test_col = [&](const std::string& t) { return fmt::format("{:>{}}", t, tw); };
  std::cout << fmt::format("| {:>9} | {:<6} | {:<8} | {:>7} | {} | {:>20} | {:>12} |\n",
                           "placement", "engine", "quant", "threads", test_col("test"), "tok/s",
                           "% of limit");
  std::cout << "| --------: | ------ | -------- | ------: | " << std::string(tw - 1, '-')
            << ": | -------------------: | -----------: |\n";
  for (const ConfigResult& c : results) {
    if (c.reps_done == 0) continue;  // interrupted before its first timed repetition
    const std::string th = c.threads > 0 ? std::to_string(c.threads) : "-";
    const char* eng = engine_kind_name(runs[c.placement].engine);
    if (opt.prompt > 0 && !c.prefill.samples.empty()) {
      std::cout << fmt::format(
          "| {:>9} | {:<6} | {:<8} | {:>7} | {} | {:>20} | {:>12} |\n", c.placement + 1, eng,
          quant_name(model.quant), th, test_col(fmt::format("pp{}", opt.prompt)),
          fmt::format("{:.2f} ± {:.2f}", c.prefill.mean, c.prefill.stddev), "");
    }
    if (opt.gen > 0) {
      const double f = pct_of_limit(c);
      const std::string pct = f > 0 ? fmt::format("{:.1f} %", 100.0 * f) : "n/a";
      std::cout << fmt::format("| {:>9} | {:<6} | {:<8} | {:>7} | {} | {:>20} | {:>12} |\n",
                               c.placement + 1, eng, quant_name(model.quant), th,
                               test_col(tg_label(opt.gen, c.batch, false)),
                               fmt::format("{:.2f} ± {:.2f}", c.decode.mean, c.decode.stddev), pct);
      if (c.batch > 1) {
        std::cout << fmt::format(
            "| {:>9} | {:<6} | {:<8} | {:>7} | {} | {:>20} | {:>12} |\n", c.placement + 1, eng,
            quant_name(model.quant), th, test_col(tg_label(opt.gen, c.batch, true)),
            fmt::format("{:.2f} ± {:.2f}", c.decode_per_seq.mean, c.decode_per_seq.stddev), "");
      }
    }
  }
  // Layer splits over several GPUs: what ran (GPUs, stages, the transport auto chose and its
  // measured hop times), after the table so single-GPU output keeps its shape.
  bool split_header = false;
  for (size_t k = 0; k < results.size(); ++k) {
    const ConfigResult& c = results[k];
    if (!runs[c.placement].summary.gpu_transport) continue;
    if (k > 0 && results[k - 1].placement == c.placement && results[k - 1].threads == c.threads) {
      continue;  // another batch row of the same engine
    }
    if (!split_header) std::cout << "\n";
    split_header = true;
    std::cout << fmt::format("# engine of placement {}: {}\n", c.placement + 1, c.engine_desc);
  }
  if (partial.signal != 0) {
    std::cout.flush();
    throw Interrupted(partial.signal, kPartialFix);
  }
}

// ---- text generation: --prompt TEXT ----

// Generates opt.gen tokens (greedy) for opt.batch sequences from the prompt texts on the
// CpuEngine, printing the text: one sequence streams to stdout as it is generated (a UTF-8
// character split over tokens is printed when complete); a batch prints each sequence at the
// end. Rates go to stderr (or into the JSON document).
void run_generate(const RunOptions& opt) {
  if (uses_placements(opt)) {
    throw_usage("--prompt",
                "text generation runs on the CPU engine (a plain --model run) for now",
                "drop the placement flags, or give -p N to benchmark the placement");
  }
  std::vector<int> thread_list = check_common(opt);
  if (thread_list.size() > 1) {
    throw_usage("--threads", "text generation takes one thread count", "e.g. --threads 16");
  }
  if (batch_list(opt).size() > 1) {
    throw_usage("--batch", "text generation takes one batch size", "e.g. --batch 4");
  }
  if (opt.gen < 1) throw_usage("-n", "must be >= 1 to generate text", "e.g. -n 64");
  // The tokenizer first: a model without a usable one fails before its weights are loaded.
  const ModelTokenizer mt = load_model_tokenizer(opt.model);
  const Tokenizer& tok = mt.tokenizer;
  std::vector<std::vector<int32_t>> prompt_ids;
  for (const std::string& t : opt.texts) {
    prompt_ids.push_back(tok.encode(t));
    if (prompt_ids.back().empty()) {
      throw_usage("--prompt", "the prompt text is empty", "give some text, e.g. --prompt \"Hi\"");
    }
  }
  ModelWeights model = load_model_for_cli(opt.model, opt.json);
  const int64_t V = model.cfg.vocab;
  if (tok.size() > V) {
    throw Error(opt.model,
                fmt::format("the tokenizer has {} tokens but the model's vocabulary is {}",
                            tok.size(), V),
                "use a GGUF whose tokenizer matches its embedding table");
  }
  const int64_t B = opt.batch;
  const size_t P = prompt_ids.size();
  int64_t longest = 0;
  for (const auto& p : prompt_ids) longest = std::max<int64_t>(longest, p.size());
  const int64_t ctx = longest + opt.gen + 1;
  if (model.cfg.context_length > 0 && ctx > model.cfg.context_length) {
    throw_usage("--prompt/-n",
                fmt::format("{} tokens exceed the model's context of {}", ctx,
                            model.cfg.context_length),
                "use a shorter prompt or a smaller -n");
  }
  CpuEngineOptions eo;
  eo.threads = thread_list.front();
  eo.max_context = ctx;
  eo.max_batch = std::min<int64_t>(longest, 512);
  eo.max_sequences = B;
  CpuEngine engine(model, eo);
  if (!opt.json) {
    std::cerr << fmt::format("ktune: tokenizer: {}\n", mt.source);
    if (mt.synthetic) {
      std::cerr << "ktune: note: the model has no vocabulary of its own (synth: and gen-model "
                   "models have random weights), so the generated text is gibberish; the speed "
                   "is real\n";
    }
  }

  struct Seq {
    const std::vector<int32_t>* prompt = nullptr;
    std::string prompt_text;
    std::vector<int32_t> ids;
    std::string text;
    StreamDecoder stream;
    bool done = false;
  };
  std::vector<Seq> seqs(static_cast<size_t>(B));
  std::vector<int32_t> next(static_cast<size_t>(B));
  std::vector<float> logits;
  const bool stream_out = B == 1 && !opt.json;
  double prefill_s = 0.0;
  int64_t prompt_tokens = 0;
  for (int64_t b = 0; b < B; ++b) {
    Seq& s = seqs[static_cast<size_t>(b)];
    s.prompt = &prompt_ids[static_cast<size_t>(b) % P];
    s.prompt_text = opt.texts[static_cast<size_t>(b) % P];
    engine.set_sequence(b);
    const double t0 = now_seconds();
    engine.prefill(s.prompt->data(), static_cast<int64_t>(s.prompt->size()), &logits, false);
    prefill_s += now_seconds() - t0;
    prompt_tokens += static_cast<int64_t>(s.prompt->size());
    next[static_cast<size_t>(b)] = CpuEngine::argmax(logits.data(), V);
  }
  if (stream_out) std::cout << seqs[0].prompt_text << std::flush;
  // Token i of every sequence comes from the previous step's logits; a sequence that reached
  // an end-of-generation token stops printing (a batch keeps computing it until all stop).
  int64_t steps = 0;
  double decode_s = 0.0;
  for (int64_t i = 0; i < opt.gen && !interrupted(); ++i) {
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      Seq& s = seqs[static_cast<size_t>(b)];
      if (s.done) continue;
      const int32_t t = next[static_cast<size_t>(b)];
      s.ids.push_back(t);
      if (tok.is_end_of_generation(t)) {
        s.done = true;
        continue;
      }
      const std::string piece = s.stream.push(tok.token_bytes(t));
      s.text += piece;
      if (stream_out) std::cout << piece << std::flush;
      all_done = false;
    }
    if (all_done || i + 1 == opt.gen) break;
    const double t0 = now_seconds();
    if (B == 1) {
      engine.decode(next[0], &logits);
    } else {
      engine.decode_batch(next.data(), B, &logits);
    }
    decode_s += now_seconds() - t0;
    ++steps;
    for (int64_t b = 0; b < B; ++b) {
      next[static_cast<size_t>(b)] = CpuEngine::argmax(logits.data() + b * V, V);
    }
  }
  for (Seq& s : seqs) {
    const std::string tail = s.stream.finish();
    s.text += tail;
    if (stream_out) std::cout << tail;
  }
  const double pp_tok_s = prefill_s > 0 ? static_cast<double>(prompt_tokens) / prefill_s : 0.0;
  const double per_seq = decode_s > 0 ? static_cast<double>(steps) / decode_s : 0.0;
  const double aggregate = per_seq * static_cast<double>(B);
  const int sig = interrupt_signal();

  if (opt.json) {
    nlohmann::json doc = report_header(model, engine.threads(), cpu::isa_name(engine.isa()));
    doc["tokenizer"] = {{"source", mt.source},
                        {"synthetic", mt.synthetic},
                        {"pre", pre_tokenizer_name(tok.pre())}};
    doc["batch"] = B;
    doc["gen_tokens"] = opt.gen;
    doc["prefill_tok_s"] = pp_tok_s;
    doc["decode_steps"] = steps;
    doc["decode_tok_s"] = aggregate;
    doc["decode_tok_s_per_sequence"] = per_seq;
    doc["partial"] = sig != 0;
    nlohmann::json out = nlohmann::json::array();
    for (const Seq& s : seqs) {
      out.push_back({{"prompt", s.prompt_text},
                     {"prompt_ids", *s.prompt},
                     {"ids", s.ids},
                     {"text", s.text},
                     {"stopped", s.done ? "end_of_generation" : "length"}});
    }
    doc["sequences"] = out;
    std::cout << doc.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  } else {
    if (stream_out) {
      std::cout << "\n";
    } else {
      for (int64_t b = 0; b < B; ++b) {
        const Seq& s = seqs[static_cast<size_t>(b)];
        std::cout << fmt::format("--- sequence {} ---\n{}{}\n", b, s.prompt_text, s.text);
      }
    }
    std::cout.flush();
    std::cerr << fmt::format(
        "ktune: prompt {} tokens, prefill {:.1f} tok/s; {} decode steps, {:.2f} tok/s per "
        "sequence{}\n",
        prompt_tokens, pp_tok_s, steps, per_seq,
        B > 1 ? fmt::format(", {:.2f} tok/s aggregate (batch {})", aggregate, B) : "");
  }
  if (sig != 0) throw Interrupted(sig, "the generated text above is partial");
}

}  // namespace

std::vector<MeasuredPlacement> measure_placements(const std::string& model_spec,
                                                  std::vector<Placement> placements,
                                                  const std::vector<std::string>& labels,
                                                  const MeasureSettings& ms) {
  RunOptions opt;
  opt.prompt = ms.prompt;
  opt.gen = ms.gen;
  opt.reps = ms.reps;
  opt.json = ms.quiet;
  check_common(opt);
  Budgets budgets = default_budgets();
  if (!ms.gpu_mem.empty()) apply_budget_overrides(budgets, ms.gpu_mem, "--gpu-mem", Device::Cuda);
  if (!ms.cpu_mem.empty()) apply_budget_overrides(budgets, ms.cpu_mem, "--cpu-mem", Device::Cpu);
  ModelShape shape = model_shape(model_spec, ms.quiet);
  check_context(shape.cfg, opt);
  const int64_t needed = std::max<int64_t>(opt.prompt, 1) + opt.gen + 1;
  std::vector<PlannedRun> runs;
  for (size_t i = 0; i < placements.size(); ++i) {
    runs.push_back(plan_run(std::move(placements[i]),
                            i < labels.size() ? labels[i] : fmt::format("placement {}", i + 1),
                            shape, RuntimeOverrides{}, budgets, needed));
  }
  ModelWeights model =
      shape.opened ? std::move(*shape.opened) : load_model_for_cli(model_spec, ms.quiet);
  const auto prompt = bench_tokens(std::max<int64_t>(opt.prompt, 1), model.cfg.vocab, opt.seed);
  std::vector<MeasuredPlacement> out;
  for (const PlannedRun& r : runs) {
    throw_if_interrupted("verification stopped");
    MeasuredPlacement m;
    // The placement's concurrent sequences (a search for a workload with batch B): decode rows
    // of B sequences, all sequences' tokens per second.
    RunOptions ob = opt;
    ob.batch = std::max<int64_t>(r.placement.runtime.batch, 1);
    if (r.engine == EngineKind::Cpu) {
      const RunResult rr = bench_one(model, ob, default_threads(r.placement, r.engine), r.context);
      m.prefill = rr.prefill;
      m.decode = rr.decode;
      m.engine = "cpu";
      m.threads = rr.threads;
    } else {
      GpuBenchSettings s = gpu_bench_settings(r, ob, 0, !ms.quiet);
      s.count_experts = false;  // verification measures speed only
      const GpuBenchResult g = bench_gpu_engine(model, s, prompt);
      m.prefill = g.prefill;
      m.decode = g.decode;
      m.engine = g.describe;
      m.graph = s.cuda_graph;
    }
    out.push_back(m);
  }
  // A run cut short by Ctrl-C returns what it measured; a measurement of part of a run must
  // not choose the placement (it read as 0 tok/s and a best.yaml was written).
  throw_if_interrupted("verification stopped");
  return out;
}

std::vector<int64_t> batch_list(const RunOptions& opt) {
  return opt.batches.empty() ? std::vector<int64_t>{opt.batch} : opt.batches;
}

const char* engine_kind_name(EngineKind k) {
  return k == EngineKind::Cpu ? "cpu" : k == EngineKind::Gpu ? "gpu" : "hybrid";
}

bool uses_placements(const RunOptions& opt) {
  return !opt.configs.empty() || !opt.experts_on_gpu.empty() || !opt.cuda_graph.empty() ||
         !opt.moe_kernel.empty() || !opt.cpu_handoff.empty() || !opt.gpu_mem.empty() ||
         !opt.gpus.empty() || !opt.gpu_transport.empty() || !opt.pcie_assist.empty() ||
         !opt.cpu_mem.empty();
}

double expected_distinct_experts(int64_t n_experts, int64_t top_k, int64_t batch) {
  if (n_experts <= 0 || top_k <= 0 || batch <= 0) return 0.0;
  const double e = static_cast<double>(n_experts);
  const double p = std::min(1.0, static_cast<double>(top_k) / e);
  return e * (1.0 - std::pow(1.0 - p, static_cast<double>(batch)));
}

void run_benchmark(const RunOptions& opt) {
  if (!opt.texts.empty()) {
    run_generate(opt);
  } else if (uses_placements(opt)) {
    run_placements(opt);
  } else {
    run_plain(opt);
  }
}

std::string describe_layer_devices(const Placement& p, int max_groups) {
  std::string out;
  int groups = 0;
  for (int64_t l = 0; l < p.n_layers();) {
    const std::string sig = layer_signature(p.layers[l]);
    int64_t e = l + 1;
    while (e < p.n_layers() && layer_signature(p.layers[e]) == sig) ++e;
    if (groups == max_groups) {
      out += " / ...";
      break;
    }
    out += (groups ? " / " : "") +
           (e - l == 1 ? fmt::format("layer {}", l) : fmt::format("layers {}-{}", l, e - 1)) +
           ": " + sig;
    ++groups;
    l = e;
  }
  return out;
}

EngineKind choose_engine(const Placement& p, const std::string& where, int numa_nodes) {
  // [issue 7 NUMA] Placements on cpu:N, on a machine with several nodes.
  if (!placement_numa_nodes(p).empty()) {
    if (numa_nodes <= 0) numa_nodes = host_numa_topology().size();
    if (numa_nodes > 1) {
      throw Error(where,
                  "placements on NUMA nodes (" + describe_layer_devices(p) +
                      ") are not implemented in this build yet (the engines run one CPU pool "
                      "over all " + std::to_string(numa_nodes) + " nodes)",
                  "put the CPU experts on plain cpu (every node)");
    }
  }
  bool any_cpu = false;
  std::set<Device> gpus;
  for (int64_t l = 0; l < p.n_layers(); ++l) {
    const LayerPlacement& lp = p.layers[l];
    any_cpu = any_cpu || lp.attention.is_cpu();
    if (lp.attention.is_gpu()) gpus.insert(lp.attention);
    for (const Device& d : lp.experts) {
      any_cpu = any_cpu || d.is_cpu();
      if (d.is_gpu()) gpus.insert(d);
    }
  }
  if (gpus.empty()) return EngineKind::Cpu;
  std::vector<int64_t> cpu_attention;
  for (int64_t l = 0; l < p.n_layers(); ++l) {
    if (!p.layers[l].attention.is_gpu()) cpu_attention.push_back(l);
  }
  if (!cpu_attention.empty()) {
    throw Error(where,
                "hybrid placements need every layer's attention on cuda:0 or another GPU "
                "(layers " + format_id_ranges(cpu_attention) + " have attention on the CPU, "
                "with GPU work elsewhere: " + describe_layer_devices(p) + ")",
                "put every layer's attention on a GPU (experts may stay on cpu), or run all on "
                "cpu");
  }
  // The layer split's rules: a layer's GPU experts on its attention's GPU, one range per GPU.
  plan_gpu_stages(p, where);
  return any_cpu ? EngineKind::Hybrid : EngineKind::Gpu;
}

RuntimeOverrides parse_runtime_overrides(const std::string& cuda_graph,
                                         const std::string& moe_kernel,
                                         const std::string& cpu_handoff,
                                         const std::string& gpu_transport,
                                         const std::string& pcie_assist) {
  RuntimeOverrides o;
  if (!pcie_assist.empty()) o.pcie_assist_permille = parse_pcie_assist(pcie_assist, "--pcie-assist");
  if (!gpu_transport.empty()) o.gpu_transport = parse_gpu_transport(gpu_transport, "--gpu-transport");
  if (!cuda_graph.empty()) {
    if (cuda_graph == "on") {
      o.cuda_graph = true;
    } else if (cuda_graph == "off") {
      o.cuda_graph = false;
    } else {
      throw_usage("--cuda-graph", "`" + cuda_graph + "` is not on or off",
                  "use --cuda-graph on or --cuda-graph off");
    }
  }
  if (!moe_kernel.empty()) {
    if (moe_kernel == "fused") {
      o.moe_kernel = MoeKernel::Fused;
    } else if (moe_kernel == "unfused") {
      o.moe_kernel = MoeKernel::Unfused;
    } else {
      throw_usage("--moe-kernel", "`" + moe_kernel + "` is not fused or unfused",
                  "use --moe-kernel fused or --moe-kernel unfused");
    }
  }
  if (!cpu_handoff.empty()) {
    if (cpu_handoff == "flags") {
      o.cpu_handoff = CpuHandoff::Flags;
    } else if (cpu_handoff == "host_node") {
      o.cpu_handoff = CpuHandoff::HostNode;
    } else {
      throw_usage("--cpu-handoff", "`" + cpu_handoff + "` is not flags or host_node",
                  "use --cpu-handoff flags or --cpu-handoff host_node");
    }
  }
  if (const char* env = std::getenv("KTUNE_CUDA_GRAPH")) {
    const std::string v = env;
    o.env_graph_off = v == "0" || v == "off" || v == "false";
  }
  return o;
}

void apply_runtime_overrides(Placement& p, const RuntimeOverrides& o) {
  if (o.moe_kernel) {
    p.runtime.moe_kernel = *o.moe_kernel;
    if (*o.moe_kernel == MoeKernel::Unfused && !o.cuda_graph) p.runtime.cuda_graph = false;
  }
  if (o.cuda_graph) p.runtime.cuda_graph = *o.cuda_graph;
  if (o.cpu_handoff) p.runtime.cpu_handoff = *o.cpu_handoff;
  if (o.gpu_transport) p.runtime.gpu_transport = *o.gpu_transport;
  if (o.pcie_assist_permille) p.runtime.pcie_assist_permille = *o.pcie_assist_permille;
  if (o.env_graph_off) p.runtime.cuda_graph = false;
}

void check_gpus_present(const Placement& p) {
  std::vector<Device> need;
  for (const Device& d : p.devices()) {
    if (d.is_gpu()) need.push_back(d);
  }
  if (need.empty()) return;
  const GpuInfo info = query_gpus();
  for (const Device& d : need) {
    bool have = false;
    for (const GpuDevice& g : info.devices) have = have || g.index == d.index;
    if (have) continue;
    if (info.devices.empty()) {
      throw Error(d.to_string(), "no GPU here (" + info.unavailable_reason + ")",
                  "run this placement on a machine with a GPU, or use an all-cpu placement");
    }
    throw Error(
        d.to_string(),
        fmt::format("no such GPU here (this machine has cuda:0..cuda:{})", info.devices.size() - 1),
        "use the GPUs this machine has in the placement");
  }
}

PlacementSummary summarize_placement(const std::string& label, const Placement& p,
                                     const MemoryPlan& plan, EngineKind engine) {
  PlacementSummary s;
  s.label = label;
  s.engine = engine;
  for (const auto& [d, n] : expert_counts(p)) s.experts[d.to_string()] += n;
  for (const auto& [d, u] : plan.per_device) {
    s.bytes[d] = u.total;
    s.budget[d] = u.budget;
  }
  s.cuda_graph = engine != EngineKind::Cpu && p.runtime.cuda_graph;
  if (engine == EngineKind::Hybrid) {
    s.cpu_handoff = p.runtime.cpu_handoff;
    s.pcie_assist_permille = p.runtime.pcie_assist_permille;
  }
  if (engine != EngineKind::Cpu) {
    const std::vector<int> devs = layer_devices(p);
    if (std::set<int>(devs.begin(), devs.end()).size() > 1) {
      s.gpu_transport = p.runtime.gpu_transport;
      s.gpu_stages = plan_gpu_stages(p, label).describe();
    }
  }
  s.moe_kernel = p.runtime.moe_kernel;
  s.cpu_threads = p.runtime.cpu_threads;
  s.context = p.runtime.context;
  return s;
}

std::string PlacementSummary::line() const {
  std::string ex, mem;
  for (const auto& [d, n] : experts) ex += (ex.empty() ? "" : ", ") + d + " " + std::to_string(n);
  for (const auto& [d, b] : bytes) {
    mem += (mem.empty() ? "" : ", ") + d + " " + format_bytes(static_cast<double>(b));
    const auto it = budget.find(d);
    if (it != budget.end() && it->second >= 0) {
      mem += " of " + format_bytes(static_cast<double>(it->second));
    }
  }
  return fmt::format(
      "engine {} | experts: {} | memory: {} | graph {} | moe {}{}{}{}", engine_kind_name(engine),
      ex, mem, cuda_graph ? "on" : "off", moe_kernel_name(moe_kernel),
      cpu_handoff ? std::string(" | handoff ") + cpu_handoff_name(*cpu_handoff) : std::string(),
      pcie_assist_permille > 0 ? " | pcie assist " + pcie_assist_text(pcie_assist_permille)
                               : std::string(),
      gpu_transport ? std::string(" | transport ") + gpu_transport_name(*gpu_transport) +
                          " | stages " + gpu_stages
                    : std::string());
}

// ---- ktune profile (added by the profiler): one placement, prepared for profiling ----

PreparedRun prepare_single_run(const RunOptions& opt) {
  if (opt.configs.size() > 1) {
    throw_usage("--config", "profile takes one placement, not a list",
                "profile one YAML at a time (e.g. --config best.yaml)");
  }
  for (int t : opt.threads) {
    if (t < 1 || t > 4096) {
      throw_usage("--threads", fmt::format("{} is not a thread count", t), "e.g. --threads 16");
    }
  }
  if (opt.threads.size() > 1) {
    throw_usage("--threads", "profile takes one thread count", "e.g. --threads 16");
  }
  PlannedSweep sweep = plan_sweep(opt, true);
  if (sweep.runs.size() != 1) {
    throw_usage("--experts-on-gpu/--cuda-graph/--moe-kernel/--cpu-handoff/--pcie-assist",
                fmt::format("profile takes one placement and one value of each runtime flag "
                            "({} combinations given)",
                            sweep.runs.size()),
                "give one value each (lists are for `ktune run` sweeps)");
  }
  PlannedRun& p = sweep.runs.front();
  PreparedRun r;
  r.label = p.label;
  r.placement = std::move(p.placement);
  r.engine = p.engine;
  r.summary = p.summary;
  r.context = p.context;
  r.threads = opt.threads.empty() ? default_threads(r.placement, r.engine) : opt.threads.front();
  r.model =
      sweep.shape.opened ? std::move(*sweep.shape.opened) : load_model_for_cli(sweep.spec, true);
  return r;
}

}  // namespace ktune::cli
