// `ktune profile` (profiler/profile_run.h).
#include "profiler/profile_run.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <random>

#include "ktune/engine/atomic_file.h"
#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/gpu_stages.h"
#include "ktune/engine/interrupt.h"
#include "ktune/engine/thread_pool.h"
#include "ktune/engine/trace.h"
#include "profiler/chrome_trace.h"
#include "profiler/cupti_activity.h"
#include "profiler/hardware.h"
#include "profiler/report.h"
#include "profiler/trace_padding.h"

namespace ktune::profiler {

using nlohmann::json;

namespace {

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<int32_t> tokens_for(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(std::max<int64_t>(n, 1)));
  for (auto& x : t) x = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return t;
}

// Ctrl-C / SIGTERM (interrupt.h): polled between tokens, windows and probes; nothing is written.
void stop_if_interrupted() { throw_if_interrupted("no profile was written"); }

// The engine under the profiler: the CpuEngine or the GpuEngine behind one interface.
class Stepper {
 public:
  virtual ~Stepper() = default;
  virtual void reset() = 0;
  virtual void prefill(const std::vector<int32_t>& tokens, int64_t n) = 0;
  // n decode steps from `first`, greedy; returns when the last one is complete.
  virtual void decode(int32_t first, int64_t n) = 0;
  virtual std::vector<std::vector<uint64_t>> expert_counts() const { return {}; }
  virtual std::string describe() const = 0;
};

class CpuStepper : public Stepper {
 public:
  // sequences > 1: decode() steps that many sequences at once (CpuEngine::decode_batch), the
  // first starting from `first`, the others from the tokens after it.
  CpuStepper(const ModelWeights& m, int threads, int64_t ctx, int64_t batch, int64_t sequences)
      : engine_(m,
                [&] {
                  CpuEngineOptions o;
                  o.threads = threads;
                  o.max_context = ctx;
                  o.max_batch = std::clamp<int64_t>(batch, 1, 512);
                  o.max_sequences = std::max<int64_t>(1, sequences);
                  return o;
                }()),
        vocab_(m.cfg.vocab),
        sequences_(std::max<int64_t>(1, sequences)) {}
  void reset() override { engine_.reset(); }
  void prefill(const std::vector<int32_t>& t, int64_t n) override {
    engine_.prefill(t.data(), n, &logits_, false);
  }
  void decode(int32_t first, int64_t n) override {
    if (sequences_ > 1) {
      std::vector<int32_t> toks(static_cast<size_t>(sequences_));
      for (int64_t b = 0; b < sequences_; ++b) {
        toks[static_cast<size_t>(b)] = static_cast<int32_t>((first + b) % vocab_);
      }
      for (int64_t i = 0; i < n; ++i) {
        stop_if_interrupted();
        engine_.decode_batch(toks.data(), sequences_, &logits_);
        for (int64_t b = 0; b < sequences_; ++b) {
          toks[static_cast<size_t>(b)] = CpuEngine::argmax(logits_.data() + b * vocab_, vocab_);
        }
      }
      return;
    }
    int32_t tok = first;
    for (int64_t i = 0; i < n; ++i) {
      stop_if_interrupted();
      engine_.decode(tok, &logits_);
      tok = CpuEngine::argmax(logits_.data(), vocab_);
    }
  }
  std::vector<std::vector<uint64_t>> expert_counts() const override {
    return engine_.expert_counts();
  }
  std::string describe() const override {
    return fmt::format("cpu engine, {} threads, {}", engine_.threads(),
                       cpu::isa_name(engine_.isa()));
  }
  int threads() const { return engine_.threads(); }

 private:
  CpuEngine engine_;
  int64_t vocab_;
  int64_t sequences_;
  std::vector<float> logits_;
};

class GpuStepper : public Stepper {
 public:
  // o.max_sequences > 1: decode() steps that many sequences at once
  // (GpuEngine::generate_greedy_batch), the first starting from `first`, the others from the
  // tokens after it (as CpuStepper).
  GpuStepper(const ModelWeights& m, const GpuEngineOptions& o)
      : engine_(m, o), vocab_(m.cfg.vocab), sequences_(std::max<int64_t>(1, o.max_sequences)) {}
  void reset() override { engine_.reset(); }
  void prefill(const std::vector<int32_t>& t, int64_t n) override {
    engine_.set_sequence(0);
    engine_.prefill(t.data(), n, nullptr);
  }
  void decode(int32_t first, int64_t n) override {
    if (sequences_ > 1) {
      std::vector<int32_t> toks(static_cast<size_t>(sequences_));
      for (int64_t b = 0; b < sequences_; ++b) {
        toks[static_cast<size_t>(b)] = static_cast<int32_t>((first + b) % vocab_);
      }
      engine_.generate_greedy_batch(toks.data(), sequences_, n);
      return;
    }
    engine_.generate_greedy(first, n);
  }
  std::string describe() const override { return engine_.describe(); }
  std::vector<std::vector<uint64_t>> expert_counts() const override {
    return engine_.expert_counts();
  }

 private:
  GpuEngine engine_;
  int64_t vocab_;
  int64_t sequences_;
};

int64_t expert_bytes_of_layer(const ModelWeights& m, size_t l) {
  const LayerWeights& L = m.layers[l];
  const int64_t n = std::max<int64_t>(m.cfg.n_experts, 1);
  return (L.gate_exps.nbytes() + L.up_exps.nbytes() + L.down_exps.nbytes()) / n;
}

// Expert bytes to the device that holds the experts: a GPU under its name, the host under cpu
// and, for a NUMA node's experts, also under cpu:N.
void add_expert_bytes(std::map<std::string, double>& per_device, const Device& d, double bytes) {
  if (d.is_gpu()) {
    per_device[d.to_string()] += bytes;
    return;
  }
  per_device["cpu"] += bytes;
  if (d.index >= 0) per_device[d.to_string()] += bytes;
}

std::vector<profile::ThreadRate> moe_curve_on(const ModelWeights& w, int threads, int iters) {
  ThreadPool pool(threads);
  CpuMoe moe(w, pool);
  const int64_t hidden = w.cfg.hidden, k = w.cfg.n_experts_used, n_exp = w.cfg.n_experts;
  std::vector<float> h(static_cast<size_t>(hidden), 0.01f), y(static_cast<size_t>(hidden));
  std::vector<int32_t> all(static_cast<size_t>(n_exp)), ids(static_cast<size_t>(k));
  for (int64_t e = 0; e < n_exp; ++e) all[static_cast<size_t>(e)] = static_cast<int32_t>(e);
  std::vector<float> wts(static_cast<size_t>(k), 1.0f / static_cast<float>(k));
  std::mt19937 rng(5);
  double secs = 0, bytes = 0;
  for (int it = 0; it < iters; ++it) {
    std::shuffle(all.begin(), all.end(), rng);
    std::copy(all.begin(), all.begin() + k, ids.begin());
    std::sort(ids.begin(), ids.end());
    size_t l = static_cast<size_t>(it) % w.layers.size();
    // deepseek2's leading dense layers have no experts: take the first MoE layer instead.
    for (size_t i = 0; i < w.layers.size() && w.cfg.is_dense_layer(static_cast<int64_t>(l)); ++i) {
      l = (l + 1) % w.layers.size();
    }
    const int64_t t0 = trace::now_ns();
    moe.compute(static_cast<int64_t>(l), h.data(), ids.data(), wts.data(), static_cast<int>(k),
                y.data());
    secs += static_cast<double>(trace::now_ns() - t0) * 1e-9;
    bytes += static_cast<double>(k * expert_bytes_of_layer(w, l));
  }
  return {{threads, std::max(bytes / secs / 1e9, 1e-3)}};
}

std::string quant_label(const ModelWeights& m) { return quant_name(m.quant); }

void fill_model_shape(profile::ModelShape& s, const ModelWeights& m) {
  s.name = m.cfg.name.empty() ? m.source : m.cfg.name;
  s.quant = quant_label(m);
  std::transform(s.quant.begin(), s.quant.end(), s.quant.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  s.n_layers = m.cfg.n_layers;
  s.n_experts = m.cfg.n_experts;
  s.n_experts_used = m.cfg.n_experts_used;
  s.expert_bytes = 0;  // of the first layer with experts (deepseek2 leads with dense layers)
  for (size_t l = 0; l < m.layers.size() && s.expert_bytes == 0; ++l) {
    s.expert_bytes = expert_bytes_of_layer(m, l);
  }
}

Verdict hardware_verdict(const profile::ProfileSummary& s) {
  Verdict v;
  const double dram = s.cpu.read_gb_s.empty() ? 0 : s.cpu.read_gb_s.back().value;
  const double moe =
      s.cpu_costs.moe_decode_gb_s.empty() ? 0 : s.cpu_costs.moe_decode_gb_s.back().value;
  v.headline = fmt::format("CPU reads {:.1f} GB/s ({} threads), CPU experts {:.1f} GB/s", dram,
                           s.cpu.read_gb_s.empty() ? 0 : s.cpu.read_gb_s.back().threads, moe);
  for (size_t i = 0; i < s.gpus.size(); ++i) {
    const profile::GpuInfo& g = s.gpus[i];
    const profile::GpuCosts& c = s.gpu_costs[i];
    v.headline +=
        fmt::format("; {} reads {:.0f} GB/s, fused MoE {:.0f} GB/s vs unfused {:.0f} GB/s",
                    g.device, g.read_gb_s, c.moe_fused_gb_s, c.moe_unfused_gb_s);
    v.reasons.push_back(fmt::format(
        "{}: eager launch {:.2f} µs vs graph node {:.2f} µs (keep CUDA Graph on for decode); "
        "host node {:.1f} µs vs mapped-flag round trip {:.1f} µs per CPU hand-off",
        g.device, c.launch_eager_us, c.graph_node_us, c.host_node_us, c.flag_handoff_us));
    v.reasons.push_back(fmt::format("{}: H2D {:.1f} GB/s, D2H {:.1f} GB/s, PCIe gen{} x{}",
                                    g.device, g.h2d_gb_s, g.d2h_gb_s, g.pcie_gen, g.pcie_width));
  }
  if (s.gpus.empty()) v.reasons.push_back("no GPU here: the profile describes the CPU only");
  if (s.gpus.size() > 1 && s.interconnect.empty()) {
    v.reasons.push_back("GPU links not measured (see hardware.interconnect for why)");
  }
  for (const profile::GpuLink& l : s.interconnect) {
    v.reasons.push_back(fmt::format(
        "{} -> {}: peer copy {:.1f} GB/s, {:.1f} µs per transfer ({}); NCCL send/recv {}", l.src,
        l.dst, l.peer_gb_s, l.peer_latency_us, l.peer_access ? "peer access" : "through the host",
        l.nccl_gb_s > 0 ? fmt::format("{:.1f} GB/s, {:.1f} µs", l.nccl_gb_s, l.nccl_latency_us)
                        : std::string("not measured")));
  }
  return v;
}

ProfileDoc profile_hardware(const ProfileOptions& opt) {
  ProfileDoc doc;
  HardwareOptions ho;
  ho.threads = opt.run.threads;
  ho.quick = opt.quick;
  json raw = json::object();
  stamp_summary(doc.summary, "hardware");
  doc.summary.cpu = measure_cpu(ho, &raw);
  stop_if_interrupted();
  doc.summary.cpu_costs.moe_decode_gb_s =
      measure_cpu_moe(ho, &raw, &doc.summary.cpu_costs.moe_call_us, &doc.summary.cpu_costs);
  stop_if_interrupted();
  measure_gpus(ho, doc.summary, &raw);
  stop_if_interrupted();
  measure_interconnect(ho, doc.summary, &raw);
  if (doc.summary.gpus.size() < 2) raw["interconnect"] = "skipped: fewer than 2 GPUs";
  doc.hardware = raw;
  doc.topology = read_topology(0, {});
  doc.run.command = opt.command_line;
  doc.run.trace_mode = "none (machine probes)";
  doc.verdict = hardware_verdict(doc.summary);
  for (const std::string& w : doc.topology.warnings) doc.verdict.reasons.push_back(w);
  if (doc.summary.gpus.empty()) {
    doc.notes.push_back("no GPU: " + cupti_availability().reason);
  }
  return doc;
}

ProfileDoc profile_model(const ProfileOptions& opt) {
  const cli::RunOptions& ro = opt.run;
  if (ro.gen < 1) throw_usage("-n", "must be at least 1", "e.g. -n 64");
  if (ro.prompt < 0) throw_usage("-p", "must be >= 0", "e.g. -p 32, or -p 0 to skip prefill");
  if (opt.warmup < 0) throw_usage("--warmup", "must be >= 0", "e.g. --warmup 8");
  if (opt.untraced_windows < 1 || opt.untraced_windows > 100) {
    throw_usage("--baseline-windows", "must be 1..100", "e.g. --baseline-windows 3");
  }
  if (ro.batch < 1 || ro.batch > cli::kMaxBatch) {
    throw_usage("--batch", fmt::format("{} is not 1..{}", ro.batch, cli::kMaxBatch),
                "e.g. --batch 8 (sequences decoded together)");
  }
  cli::RunOptions planned = ro;
  // The engine's context must hold the longest window (warm-up and windows start at 0).
  planned.gen = std::max<int64_t>(ro.gen, opt.warmup);
  cli::PreparedRun pr = cli::prepare_single_run(planned);
  const ModelWeights& model = pr.model;
  const bool uses_gpu = pr.engine != cli::EngineKind::Cpu;

  ProfileDoc doc;
  RunInfo& run = doc.run;
  run.command = opt.command_line;
  run.model = model.source;
  run.placement = pr.label;
  run.engine = cli::engine_kind_name(pr.engine);
  run.cuda_graph = pr.summary.cuda_graph;
  run.moe_kernel = moe_kernel_name(pr.placement.runtime.moe_kernel);
  run.pcie_assist = pr.placement.runtime.pcie_assist_permille / 1000.0;
  run.prompt = ro.prompt;
  run.gen = ro.gen;
  run.batch = ro.batch;
  run.warmup = opt.warmup;
  // Decode windows count the tokens of every sequence of the batch.
  const int64_t window_tokens = ro.gen * ro.batch;

  if (opt.trace_levels.empty() || opt.trace_levels.size() > 2) {
    throw_usage("--trace-level", "needs one or two levels", "use light, full or both");
  }
  const std::vector<trace_level::Level>& levels = opt.trace_levels;
  const CuptiAvailability avail = cupti_availability();
  const bool want_cupti = uses_gpu && avail.usable;
  // The engine's NVTX ranges reach CUPTI (as markers, recorded at level full only) when NVTX's
  // injection names libcupti before the process's first NVTX call. At level light alone the
  // ranges stay no-ops: the host spans carry the same phases.
  const bool any_full =
      std::find(levels.begin(), levels.end(), trace_level::Level::Full) != levels.end();
  if (want_cupti && any_full) setup_nvtx_injection();

  Timeline tl;
  std::vector<double> untraced;
  std::vector<std::vector<double>> traced_by_level(levels.size());
  PaddingChoice padding;         // untraced steps after the traced windows
  int64_t window_ns = 0;         // the analyzed decode window's wall (+ the padding's)
  double analyzed_tok_s = 0;     // the analyzed decode window, traced
  double profile_run_tok_s = 0;  // that window + its padding
  double padding_tok_s = 0;      // the padding alone
  double pooled_tok_s = 0;       // every untraced step (windows + padding) over their wall
  int64_t baseline_ns = 0;       // the baseline windows' summed wall
  Window prefill_win, decode_win;
  std::vector<std::vector<uint64_t>> counts0, counts1;
  int threads_used = 0;
  {
    std::unique_ptr<CuptiSession> cupti;
    if (want_cupti) {
      CuptiOptions co;
      co.level = levels.front();
      cupti = std::make_unique<CuptiSession>(co);
      if (!cupti->ok()) {
        doc.notes.push_back("CUPTI could not start (" + cupti->error() + "): host spans only");
      }
    }
    std::unique_ptr<Stepper> eng;
    if (pr.engine == cli::EngineKind::Cpu) {
      auto c = std::make_unique<CpuStepper>(model, pr.threads, pr.context, ro.prompt, ro.batch);
      threads_used = c->threads();
      eng = std::move(c);
    } else {
      GpuEngineOptions go;
      go.max_context = pr.context;
      go.cuda_graph = pr.summary.cuda_graph;
      go.moe_kernel = pr.placement.runtime.moe_kernel;
      // A layer split over several GPUs (or one GPU other than cuda:0): each layer's device.
      const std::vector<int> devs = layer_devices(pr.placement);
      if (std::any_of(devs.begin(), devs.end(), [](int d) { return d != 0; })) {
        go.layer_device = devs;
      }
      go.gpu_transport = pr.placement.runtime.gpu_transport;
      go.max_sequences = std::max<int64_t>(1, ro.batch);  // concurrent sequences (one GPU)
      // Router statistics for the search (integer counters in the router's top-k tail; the
      // engines that cannot count return none and the analysis assumes uniform routing).
      go.count_experts = true;
      if (pr.engine == cli::EngineKind::Hybrid) {
        go.expert_on_gpu.resize(static_cast<size_t>(pr.placement.n_layers()));
        for (int64_t l = 0; l < pr.placement.n_layers(); ++l) {
          for (const Device& d : pr.placement.layers[static_cast<size_t>(l)].experts) {
            go.expert_on_gpu[static_cast<size_t>(l)].push_back(d.is_gpu());
          }
        }
        go.cpu_threads = pr.threads;
        threads_used = pr.threads;
      }
      eng = std::make_unique<GpuStepper>(model, go);
    }
    run.threads = threads_used;
    run.engine_description = eng->describe();
    const auto prompt = tokens_for(ro.prompt, model.cfg.vocab, ro.seed);
    const int32_t first = prompt[0];

    if (opt.warmup > 0) {
      eng->reset();
      eng->decode(first, opt.warmup);
    }

    // Traced windows: the analyzed level first (with prefill), then any other level's decode
    // window for its overhead only. Without CUPTI the level changes nothing: one pass.
    const bool cupti_on = cupti && cupti->ok();
    const size_t passes = cupti_on ? levels.size() : 1;
    for (size_t pass = 0; pass < passes; ++pass) {
      const bool analyzed = pass == 0;
      trace::start();
      trace::name_thread("main (engine driver)");
      if (cupti_on) cupti->enable(levels[pass]);
      const int64_t offset = cupti_on ? CuptiSession::steady_to_cupti_offset() : 0;
      {
        // A short traced warm-up, so the measured window does not pay CUPTI's first-launch costs.
        eng->reset();
        eng->decode(first, std::min<int64_t>(ro.gen, 4));
      }
      if (analyzed && ro.prompt > 0) {
        eng->reset();
        const int64_t t0 = trace::now_ns();
        eng->prefill(prompt, ro.prompt);
        prefill_win = {"prefill", ro.prompt, t0 + offset, trace::now_ns() + offset};
      }
      eng->reset();
      if (analyzed) counts0 = eng->expert_counts();
      const int64_t t0 = trace::now_ns();
      eng->decode(first, ro.gen);
      const int64_t t1 = trace::now_ns();
      // Tracing off before the routing counts are read: their copy is not the window's work.
      if (cupti_on) cupti->disable();
      if (analyzed) {
        counts1 = eng->expert_counts();
        decode_win = {"decode", window_tokens, t0 + offset, t1 + offset};
      }
      const double traced_tok_s =
          static_cast<double>(window_tokens) / (static_cast<double>(t1 - t0) * 1e-9);
      traced_by_level[pass].push_back(traced_tok_s);
      if (analyzed) {
        analyzed_tok_s = traced_tok_s;
        window_ns = t1 - t0;
      }
      if (cupti_on) cupti->disable_and_flush();
      trace::stop();
      if (!analyzed) {
        Timeline scratch;  // the overhead pass: its records are not analyzed
        cupti->drain_into(scratch);
        trace::collect();
        continue;
      }
      if (cupti_on) {
        cupti->drain_into(tl);
        tl.source_note = "cupti";
        run.trace_level = trace_level::level_name(levels[pass]);
        run.trace_mode = levels[pass] == trace_level::Level::Light
                             ? "cupti level light (kernels, copies, memsets, runtime calls) + "
                               "host spans"
                             : "cupti level full (kernels, copies, every runtime API call, syncs, "
                               "NVTX, CUPTI overhead) + host spans";
        if (!cupti->notes().empty()) doc.notes.push_back("CUPTI: " + cupti->notes());
      } else {
        const std::string why = !uses_gpu ? "CPU engine" : cupti ? cupti->error() : avail.reason;
        tl.source_note = "host spans only: " + why;
        run.trace_mode = "host spans only (" + why + ")";
        run.trace_level = "none";
        if (uses_gpu) {
          doc.notes.push_back("no GPU events were recorded (" + why +
                              "): GPU idle time, gaps and kernels are unknown");
        }
      }
      add_host_spans(tl, trace::collect(), offset);
      add_graph_tags(tl, trace::graph_node_tags());
    }
    // The untraced decode, after every traced window was flushed and drained, with CUPTI
    // detached (cuptiFinalize): an attached CUPTI, even with every activity kind off, slows
    // eager launches (an unfused eager hybrid ran 7 % faster detached than attached, H100), and
    // the overhead is against not profiling at all. The baseline windows and the profiling run's
    // untraced steps (the padding, whose number the traced window's dilation against the first
    // baseline window decides under auto) are the same work, so the baseline windows are spread
    // through the padding: a hybrid's speed can drift by 15 % over a 25 s run, and a baseline
    // taken only before the padding read that drift as tracing overhead. Windows of at most n
    // steps, each from position 0: the padding's steps cost what the baseline's did, and the
    // context stays n long.
    if (cupti_on && !cupti->detach()) {
      doc.notes.push_back("CUPTI could not be detached before the untraced windows (" +
                          cupti->error() + "): they may run slower than without profiling");
    }
    trace::stop();
    auto baseline_window = [&]() {
      stop_if_interrupted();
      eng->reset();
      const int64_t t0 = trace::now_ns();
      eng->decode(first, ro.gen);
      const int64_t ns = std::max<int64_t>(trace::now_ns() - t0, 1);
      untraced.push_back(static_cast<double>(window_tokens) / (static_cast<double>(ns) * 1e-9));
      baseline_ns += ns;
    };
    const int windows = std::max(1, opt.untraced_windows);
    baseline_window();
    {
      const double dilation = untraced.front() > 0 ? 1.0 - analyzed_tok_s / untraced.front() : 0;
      if (opt.trace_padding < 0) {
        padding = choose_untraced_padding(
            dilation, ro.gen, untraced.front() / static_cast<double>(ro.batch),
            kPaddingTargetFraction, kPaddingMaxExtraSeconds, kPaddingMaxWindowFactor);
      } else {
        padding.steps = padding.steps_for_target = opt.trace_padding;
        padding.run_overhead = amortised_overhead(dilation, ro.gen, padding.steps);
      }
    }
    const int64_t chunks = padding.steps > 0 ? (padding.steps + ro.gen - 1) / ro.gen : 0;
    const int spread = windows - 1;  // the other baseline windows, among the padding's chunks
    int taken = 0;
    int64_t pad_ns = 0;
    for (int64_t c = 0, done = 0; c < chunks; ++c) {
      stop_if_interrupted();
      const int64_t steps = std::min<int64_t>(ro.gen, padding.steps - done);
      eng->reset();
      const int64_t c0 = trace::now_ns();
      eng->decode(first, steps);
      pad_ns += trace::now_ns() - c0;
      done += steps;
      // Window i of `spread` after chunk (i + 1) * chunks / (spread + 1) - 1: evenly through.
      while (taken < spread && (c + 1) * (spread + 1) >= (taken + 1) * chunks) {
        baseline_window();
        ++taken;
      }
    }
    for (; taken < spread; ++taken) baseline_window();
    if (padding.steps > 0) {
      window_ns += pad_ns;
      padding_tok_s = static_cast<double>(padding.steps * ro.batch) /
                      (static_cast<double>(std::max<int64_t>(pad_ns, 1)) * 1e-9);
      pooled_tok_s = (static_cast<double>(window_tokens) * static_cast<double>(untraced.size()) +
                      static_cast<double>(padding.steps * ro.batch)) /
                     (static_cast<double>(baseline_ns + pad_ns) * 1e-9);
    }
    if (window_ns > 0) {
      profile_run_tok_s = static_cast<double>((ro.gen + padding.steps) * ro.batch) /
                          (static_cast<double>(window_ns) * 1e-9);
    }
    if (cupti_on && levels.size() > 1) {
      doc.notes.push_back(fmt::format(
          "--trace-level both: the analysis is of the level {} windows; a second decode window "
          "was traced at level {} for its overhead only",
          trace_level::level_name(levels[0]), trace_level::level_name(levels[1])));
    }
    if (!cupti_on && levels.size() > 1) {
      doc.notes.push_back(
          "--trace-level both: without CUPTI tracing records host spans only, at "
          "any level: one traced window");
    }
  }
  if (prefill_win.tokens > 0) tl.windows.push_back(prefill_win);
  tl.windows.push_back(decode_win);
  tl.origin = tl.first_time();
  if (tl.dropped_records > 0) {
    doc.notes.push_back(
        fmt::format("CUPTI dropped {} records (buffers full): GPU metrics "
                    "undercount; profile fewer tokens (-n)",
                    tl.dropped_records));
  }
  if (tl.dropped_spans > 0) {
    doc.notes.push_back(
        fmt::format("{} host spans were dropped (per-thread buffers full)", tl.dropped_spans));
  }

  // ---- analysis ----
  const auto tags = attribute_ops(tl);
  const int64_t n_layers = model.cfg.n_layers;
  const int64_t n_exp = model.cfg.n_experts, k = model.cfg.n_experts_used;
  AnalysisInputs decode_in;
  std::vector<std::vector<int64_t>> diff;
  if (!counts1.empty() && counts1.size() == counts0.size()) {
    // Measured routing: each selection's expert bytes to the device that holds the expert (the
    // CPU engine holds them all; a NUMA node's experts count under cpu and cpu:N).
    diff.assign(counts1.size(), std::vector<int64_t>(static_cast<size_t>(n_exp), 0));
    std::map<std::string, double> per_device;
    for (size_t l = 0; l < counts1.size(); ++l) {
      const double eb = static_cast<double>(expert_bytes_of_layer(model, l));
      const std::vector<Device>* ex =
          pr.engine == cli::EngineKind::Cpu || l >= pr.placement.layers.size()
              ? nullptr
              : &pr.placement.layers[l].experts;
      for (size_t e = 0; e < counts1[l].size() && e < diff[l].size(); ++e) {
        diff[l][e] = static_cast<int64_t>(counts1[l][e] - counts0[l][e]);
        const double bytes = static_cast<double>(diff[l][e]) * eb;
        if (bytes <= 0) continue;
        add_expert_bytes(per_device, ex != nullptr && e < ex->size() ? (*ex)[e] : Device::cpu(),
                         bytes);
      }
    }
    for (const auto& [dev, bytes] : per_device) decode_in.expert_bytes[dev] = bytes;
  } else {
    // The engine did not count routing: expected bytes under uniform routing, per device
    // (every GPU of a multi-GPU placement; each NUMA node's experts also under cpu:N).
    std::map<std::string, double> per_device;
    for (int64_t l = 0; l < n_layers; ++l) {
      const auto& ex = pr.placement.layers[static_cast<size_t>(l)].experts;
      const double per =
          static_cast<double>(k * expert_bytes_of_layer(model, static_cast<size_t>(l))) *
          static_cast<double>(ro.gen) / static_cast<double>(std::max<int64_t>(n_exp, 1));
      for (const Device& d : ex) add_expert_bytes(per_device, d, per);
    }
    for (const auto& [dev, bytes] : per_device) {
      if (bytes > 0) decode_in.expert_bytes[dev] = bytes;
    }
    doc.notes.push_back(
        "expert bytes assume uniform routing (this engine does not count its routing: deepseek2 "
        "on the GPU, or the KTUNE_GPU_LEGACY step)");
  }
  if (ro.batch > 1) {
    doc.notes.push_back(fmt::format(
        "batch {}: decode windows count every sequence's tokens; expert bytes count each "
        "token's selections, while a batched step reads an expert once for all its tokens (the "
        "expert bandwidth is an upper bound)",
        ro.batch));
  }
  if (prefill_win.tokens > 0) doc.windows.push_back(analyze_window(tl, tags, prefill_win, {}));
  doc.windows.push_back(analyze_window(tl, tags, decode_win, decode_in));
  const WindowMetrics& dm = doc.windows.back();
  {
    // A run whose CPU experts carried a good share of the routing measured their bandwidth
    // inside the engine: say how the search uses it (search --calibrate; docs/search.md).
    double routed = 0;
    for (int64_t l = 0; l < n_layers; ++l) {
      routed += static_cast<double>(k * expert_bytes_of_layer(model, static_cast<size_t>(l)));
    }
    for (const ExpertBandwidth& e : dm.expert_bandwidth) {
      if (e.device == "cpu" && e.gb_s > 0 && !diff.empty() && dm.tokens > 0 &&
          e.bytes / static_cast<double>(dm.tokens) >= 0.25 * routed) {
        doc.notes.push_back(fmt::format(
            "CPU experts ran at {:.1f} GB/s inside the engine: price them at that rate in a "
            "search with `ktune search --profile <this machine's profile> --calibrate {}`",
            e.gb_s, opt.out));
      }
    }
  }

  // ---- overhead ----
  Overhead& oh = doc.overhead;
  oh.untraced_tok_s = untraced;
  oh.untraced_median = median(untraced);
  oh.mode = run.trace_mode;
  oh.trace_level = run.trace_level;
  for (size_t i = 0; i < traced_by_level.size(); ++i) {
    if (traced_by_level[i].empty()) continue;
    Overhead::Level l;
    l.trace_level = run.trace_level == "none" ? "none" : trace_level::level_name(levels[i]);
    l.traced_tok_s = traced_by_level[i];
    l.traced_median = median(l.traced_tok_s);
    l.overhead_fraction = oh.untraced_median > 0 ? 1.0 - l.traced_median / oh.untraced_median : 0;
    oh.levels.push_back(l);
  }
  if (!oh.levels.empty()) {
    oh.traced_tok_s = oh.levels.front().traced_tok_s;
    oh.traced_median = oh.levels.front().traced_median;
    oh.overhead_fraction = oh.levels.front().overhead_fraction;
  }
  oh.profile_run_tok_s = profile_run_tok_s;
  oh.untraced_pooled_tok_s = pooled_tok_s;
  const double run_baseline = pooled_tok_s > 0 ? pooled_tok_s : oh.untraced_median;
  oh.profile_run_overhead_fraction =
      run_baseline > 0 ? 1.0 - profile_run_tok_s / run_baseline : 0;
  oh.untraced_padding_steps = padding.steps;
  oh.padding_tok_s = padding_tok_s;
  if (padding_tok_s > 0 && oh.untraced_median > 0 &&
      std::abs(padding_tok_s / oh.untraced_median - 1) > kPaddingDriftNoteFraction) {
    // The untraced steps of the run against the untraced windows: the same work, untraced both,
    // so a gap between them is the engine's speed moving (a hybrid's CPU stalls), not tracing.
    const double vs_padding = 1.0 - profile_run_tok_s / padding_tok_s;
    doc.notes.push_back(fmt::format(
        "the profiling run's {} untraced steps ran at {:.2f} tok/s, {:+.1f} % from the baseline "
        "windows' {:.2f}: the engine's own speed moved during the run (not tracing: both are "
        "untraced); against those steps the run's overhead is {:.1f} %",
        padding.steps, padding_tok_s, 100 * (padding_tok_s / oh.untraced_median - 1),
        oh.untraced_median, 100 * vs_padding));
  }
  oh.trace_padding = opt.trace_padding < 0    ? std::string("auto")
                     : opt.trace_padding == 0 ? std::string("off")
                                              : std::to_string(opt.trace_padding);
  {
    double launches_per_token = 0;  // of the GPU that launches most
    for (const GpuMetrics& g : dm.gpus) {
      launches_per_token = std::max(launches_per_token, g.launches_per_token);
    }
    for (std::string& n :
         tracing_overhead_notes(oh.overhead_fraction, padding, opt.trace_padding < 0,
                                run.trace_level != "none", launches_per_token)) {
      doc.notes.push_back(std::move(n));
    }
  }
  if (run.trace_level != "none") {
    oh.not_recorded =
        trace_level::select_kinds(levels.front(), trace_level::Tracer::Engine).not_recorded;
    if (!oh.not_recorded.empty()) {
      std::string what;
      for (const std::string& x : oh.not_recorded) what += (what.empty() ? "" : "; ") + x;
      doc.notes.push_back("trace level " + run.trace_level +
                          ": every metric of this report is measured; not recorded: " + what +
                          " (--trace-level full records them)");
    }
  }

  // ---- summary for the search ----
  stamp_summary(doc.summary, "model");
  HardwareOptions ho;
  ho.threads = {std::max(threads_used, 1)};
  ho.quick = opt.quick;
  doc.summary.cpu = measure_cpu(ho, nullptr);
  double cpu_bw = 0;
  for (const ExpertBandwidth& e : dm.expert_bandwidth) {
    if (e.device == "cpu") cpu_bw = e.gb_s;
  }
  if (cpu_bw > 0 && threads_used > 0) {
    doc.summary.cpu_costs.moe_decode_gb_s = {{threads_used, cpu_bw}};
  } else {
    doc.summary.cpu_costs.moe_decode_gb_s =
        moe_curve_on(model, std::max(threads_used, physical_core_count()), opt.quick ? 8 : 48);
  }
  if (uses_gpu && opt.gpu_probes) {
    HardwareOptions gq = ho;
    gq.quick = true;  // a model profile's GPU costs: the short probes (--hardware runs the long)
    measure_gpus(gq, doc.summary, nullptr);
  }
  fill_model_shape(doc.summary.model, model);
  if (!diff.empty()) {
    doc.summary.router.tokens = window_tokens;
    doc.summary.router.counts = diff;
    doc.router = analyze_router(diff, window_tokens, k);
  } else {
    doc.router.n_used = k;
    doc.router.warning =
        "no router statistics: this engine does not count its routing (deepseek2 "
        "on the GPU); profile it on the CPU engine for them";
  }

  // ---- topology and verdict ----
  std::vector<const void*> sample;
  for (size_t l = 0; l < model.layers.size() && sample.size() < 512; ++l) {
    const TensorView& g = model.layers[l].gate_exps;
    const int64_t step = std::max<int64_t>(g.nbytes() / 16, 4096);
    for (int64_t off = 0; off < g.nbytes() && sample.size() < 512; off += step) {
      sample.push_back(g.data + off);
    }
  }
  doc.topology = read_topology(threads_used, sample);
  doc.verdict = make_verdict(doc);
  doc.timeline = std::move(tl);
  return doc;
}

}  // namespace

std::string timeline_path_for(const std::string& p) {
  const std::string ext = ".json";
  if (p.size() > ext.size() && p.compare(p.size() - ext.size(), ext.size(), ext) == 0) {
    return p.substr(0, p.size() - ext.size()) + ".timeline.json";
  }
  return p + ".timeline.json";
}

namespace {

// An output that cannot be written is refused before the run (a profile takes minutes), and
// before the timeline beside profile.json is written (a folder given as -o left
// "<folder>.timeline.json" behind).
void check_output_path(const std::string& path, const char* example) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    throw Error(path, "is a folder",
                std::string("give a file name, e.g. ") + (fs::path(path) / example).string());
  }
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty() && !fs::is_directory(parent, ec)) {
    throw Error(path, "its folder " + parent.string() + " does not exist",
                "create it, or write somewhere else");
  }
}

}  // namespace

ProfileDoc run_profile(const ProfileOptions& opt) {
  if (opt.out.empty()) throw_usage("-o", "needs a file name", "e.g. -o profile.json");
  check_output_path(opt.out, "profile.json");
  if (!opt.hardware) check_output_path(timeline_path_for(opt.out), "profile.timeline.json");
  if (!opt.trace.empty()) check_output_path(opt.trace, "trace.json");
  if (!opt.report.empty()) check_output_path(opt.report, "report.html");
  ProfileDoc doc = opt.hardware ? profile_hardware(opt) : profile_model(opt);
  stop_if_interrupted();
  if (!opt.hardware) {
    const std::string side = timeline_path_for(opt.out);
    write_timeline_json(side, doc.timeline);
    const size_t slash = side.rfind('/');
    doc.timeline_file = slash == std::string::npos ? side : side.substr(slash + 1);
  }
  write_profile_json(opt.out, doc);
  if (!opt.trace.empty()) {
    write_chrome_trace(opt.trace, doc.timeline, doc.run.model + " " + doc.run.placement);
  }
  if (!opt.report.empty()) write_file_atomic(opt.report, html_report(doc));
  if (!opt.quiet) {
    std::cout << terminal_report(doc);
    std::cout << "\nwrote " << opt.out;
    if (!doc.timeline_file.empty()) std::cout << " (timeline: " << doc.timeline_file << ")";
    if (!opt.trace.empty()) std::cout << ", " << opt.trace;
    if (!opt.report.empty()) std::cout << ", " << opt.report;
    std::cout << "\n";
  }
  return doc;
}

}  // namespace ktune::profiler
