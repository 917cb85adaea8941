// `ktune run`: llama-bench-like benchmark of the engine on a model: prefill (pp) and decode (tg)
// tok/s as mean ± stddev over repetitions, with a header that says what was measured, and
// decode's ratio to the memory-bound limit (bytes read per token ÷ measured DRAM bandwidth).
#include <fmt/format.h>

#include <unistd.h>

#include <iostream>
#include <nlohmann/json.hpp>
#include <random>

#include "bench_stats.h"
#include "cli.h"
#include "ktune/engine/build_info.h"
#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/thread_pool.h"
#include "model_arg.h"

namespace ktune::cli {
namespace {

struct RunOptions {
  std::string model = "synth:tiny";
  int64_t prompt = 512;
  int64_t gen = 128;
  int reps = 5;
  std::vector<int> threads;
  bool json = false;
  bool probe = true;
  uint64_t seed = 42;
};

struct RunResult {
  int threads = 0;
  Stat prefill;  // tok/s
  Stat decode;   // tok/s
};

// Deterministic pseudo-random prompt tokens (benchmarks must not depend on a tokenizer).
std::vector<int32_t> bench_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return t;
}

RunResult bench_one(const ModelWeights& model, const RunOptions& opt, int threads) {
  CpuEngineOptions eo;
  eo.threads = threads;
  eo.max_context = std::max<int64_t>(opt.prompt, 1) + opt.gen + 1;
  eo.max_batch = std::min<int64_t>(std::max<int64_t>(opt.prompt, 1), 512);
  CpuEngine engine(model, eo);
  const auto prompt = bench_tokens(std::max<int64_t>(opt.prompt, 1), model.cfg.vocab, opt.seed);
  std::vector<float> logits;
  std::vector<double> pp, tg;
  for (int rep = 0; rep <= opt.reps; ++rep) {  // rep 0 warms up caches and pages
    if (opt.prompt > 0) {
      engine.reset();
      const double t0 = now_seconds();
      engine.prefill(prompt.data(), opt.prompt, &logits, false);
      const double dt = now_seconds() - t0;
      if (rep > 0) pp.push_back(static_cast<double>(opt.prompt) / dt);
    }
    if (opt.gen > 0) {
      // tg as llama-bench measures it: from an empty context, one token at a time, greedy.
      engine.reset();
      int32_t tok = prompt[0];
      const double t0 = now_seconds();
      for (int64_t i = 0; i < opt.gen; ++i) {
        engine.decode(tok, &logits);
        tok = CpuEngine::argmax(logits.data(), model.cfg.vocab);
      }
      const double dt = now_seconds() - t0;
      if (rep > 0) tg.push_back(static_cast<double>(opt.gen) / dt);
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
  return r;
}

void run_benchmark(const RunOptions& opt) {
  if (opt.prompt < 0 || opt.gen < 0 || (opt.prompt == 0 && opt.gen == 0)) {
    throw_usage("-p/-n", "nothing to measure", "give -p N (prefill tokens) and/or -n N (decode)");
  }
  if (opt.reps < 1 || opt.reps > 1000) throw_usage("-r", "must be 1..1000", "e.g. -r 5");
  const int cores = physical_core_count();
  std::vector<int> thread_list = opt.threads.empty() ? std::vector<int>{cores} : opt.threads;
  for (int t : thread_list) {
    if (t < 1 || t > 4096) {
      throw_usage("--threads", fmt::format("{} is not a thread count", t),
                  fmt::format("use 1..{} (this machine has {} physical cores)", cores, cores));
    }
  }
  ModelWeights model = load_model_for_cli(opt.model, opt.json);
  const int64_t ctx_needed = opt.prompt + opt.gen + 1;
  if (model.cfg.context_length > 0 && ctx_needed > model.cfg.context_length) {
    throw_usage("-p/-n", fmt::format("{} tokens exceed the model's context of {}", ctx_needed,
                                     model.cfg.context_length),
                "use smaller -p/-n");
  }

  BandwidthResult bw;
  if (opt.probe) {
    ThreadPool pool(thread_list.back());
    bw = measure_read_bandwidth(pool, default_probe_bytes(), 3);
  }
  std::vector<RunResult> results;
  for (int t : thread_list) results.push_back(bench_one(model, opt, t));

  const double bytes_tok = static_cast<double>(model.bytes_per_token_decode());
  const double limit_tok_s = bw.gb_per_s > 0 ? bw.gb_per_s * 1e9 / bytes_tok : 0.0;
  const std::string isa = cpu::isa_name(cpu::detect_isa());

  if (opt.json) {
    nlohmann::json doc = report_header(model, results.front().threads, isa);
    doc["prompt_tokens"] = opt.prompt;
    doc["gen_tokens"] = opt.gen;
    doc["repetitions"] = opt.reps;
    doc["dram_read_gb_s"] = bw.gb_per_s;
    doc["memory_bound_decode_tok_s"] = limit_tok_s;
    doc["prefill_tok_s"] = results.front().prefill.to_json();
    doc["decode_tok_s"] = results.front().decode.to_json();
    doc["decode_fraction_of_limit"] =
        limit_tok_s > 0 ? results.front().decode.mean / limit_tok_s : 0.0;
    nlohmann::json runs = nlohmann::json::array();
    for (const auto& r : results) {
      runs.push_back({{"threads", r.threads},
                      {"prefill_tok_s", r.prefill.to_json()},
                      {"decode_tok_s", r.decode.to_json()}});
    }
    doc["runs"] = runs;
    std::cout << doc.dump(2) << "\n";
    return;
  }

  const ModelConfig& c = model.cfg;
  std::cout << fmt::format("# ktune run  commit {}  (ktune {})\n", build_commit(),
                           build_version());
  std::cout << fmt::format("# cpu: {}, {} physical cores, kernels {}\n", cpu_model_name(), cores,
                           isa);
  std::cout << fmt::format(
      "# model: {} ({}, {} layers, {} experts top-{}, {} params, {} active, {})\n",
      model.source, c.arch, c.n_layers, c.n_experts, c.n_experts_used,
      format_count(static_cast<double>(c.params_total())),
      format_count(static_cast<double>(c.params_active_per_token())),
      format_bytes(static_cast<double>(model.weight_bytes())));
  if (opt.probe) {
    std::cout << fmt::format(
        "# memory: DRAM read {:.1f} GB/s ({} threads, {} buffer); decode reads {} per token => "
        "memory-bound limit {:.1f} tok/s\n",
        bw.gb_per_s, bw.threads, format_bytes(static_cast<double>(bw.bytes)),
        format_bytes(bytes_tok), limit_tok_s);
  }
  std::cout << fmt::format("# repetitions: {} (after 1 warm-up), mean ± stddev\n\n", opt.reps);
  std::cout << fmt::format("| {:<8} | {:>7} | {:>7} | {:>20} | {:>12} |\n", "quant", "threads",
                           "test", "tok/s", "% of limit");
  std::cout << "| -------- | ------: | ------: | -------------------: | -----------: |\n";
  for (const auto& r : results) {
    if (opt.prompt > 0) {
      std::cout << fmt::format("| {:<8} | {:>7} | {:>7} | {:>20} | {:>12} |\n",
                               quant_name(model.quant), r.threads, fmt::format("pp{}", opt.prompt),
                               fmt::format("{:.2f} ± {:.2f}", r.prefill.mean, r.prefill.stddev),
                               "");
    }
    if (opt.gen > 0) {
      const std::string pct =
          limit_tok_s > 0 ? fmt::format("{:.1f} %", 100.0 * r.decode.mean / limit_tok_s) : "n/a";
      std::cout << fmt::format("| {:<8} | {:>7} | {:>7} | {:>20} | {:>12} |\n",
                               quant_name(model.quant), r.threads, fmt::format("tg{}", opt.gen),
                               fmt::format("{:.2f} ± {:.2f}", r.decode.mean, r.decode.stddev),
                               pct);
    }
  }
}

}  // namespace

void add_run_command(CLI::App& app) {
  auto opt = std::make_shared<RunOptions>();
  auto* sub = app.add_subcommand(
      "run",
      "Benchmark prefill and decode speed of a model on this machine (like llama-bench).\n"
      "Example: ktune run --model synth:qwen3-30b-a3b:q4_0 -p 512 -n 128 -r 5 --threads 8,16");
  sub->add_option("-m,--model", opt->model, kModelHelp)->capture_default_str();
  sub->add_option("-p,--prompt", opt->prompt, "Prefill (prompt) tokens per repetition; 0 skips")
      ->capture_default_str();
  sub->add_option("-n,--gen", opt->gen, "Decode tokens per repetition; 0 skips")
      ->capture_default_str();
  sub->add_option("-r,--repetitions", opt->reps, "Timed repetitions (after one warm-up)")
      ->capture_default_str();
  sub->add_option("-t,--threads", opt->threads,
                  "CPU threads; a list sweeps (e.g. 8,16). Default: one per physical core")
      ->delimiter(',');
  sub->add_flag("--json", opt->json, "Print one JSON document on stdout instead of the table");
  sub->add_flag("!--no-probe", opt->probe, "Skip the DRAM bandwidth probe (no % of limit)");
  sub->callback([opt] { run_benchmark(*opt); });
}

}  // namespace ktune::cli
