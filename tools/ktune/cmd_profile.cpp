// `ktune profile`: flags -> ProfileOptions -> run_profile() (profiler/profile_run.cpp).
#include "cli.h"
#include "inject/trace_level.h"
#include "ktune/engine/error.h"
#include "model_arg.h"
#include "profiler/exec_profile.h"
#include "profiler/profile_run.h"

namespace ktune::cli {

namespace {

// "30s", "2m", "500ms", "1h" or a plain number of seconds.
double parse_duration_s(const std::string& text) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    throw_usage("--duration " + text, "is not a duration", "write e.g. 30s, 2m, 500ms or 90");
  }
  const std::string unit = text.substr(used);
  double scale = 0;
  if (unit.empty() || unit == "s") scale = 1;
  if (unit == "ms") scale = 1e-3;
  if (unit == "m" || unit == "min") scale = 60;
  if (unit == "h") scale = 3600;
  if (scale == 0 || !(v > 0)) {
    throw_usage("--duration " + text, "is not a positive duration",
                "write e.g. 30s, 2m, 500ms or 90");
  }
  // A week bounds a profile and keeps the value far from overflowing a nanosecond count.
  if (!(v * scale <= 7 * 24 * 3600.0)) {
    throw_usage("--duration " + text, "is longer than a week",
                "write e.g. 30s, 2m, 500ms or 90 (or leave --duration out: until the program ends)");
  }
  return v * scale;
}

// --trace-level: light | full, and for the engine also both (light then full). "" = light.
std::vector<trace_level::Level> parse_trace_levels(const std::string& text, bool exec) {
  if (text.empty()) return {trace_level::Level::Light};
  trace_level::Level l;
  if (trace_level::parse_level(text, &l)) return {l};
  if (text == "both") {
    if (exec) {
      throw_usage("--trace-level both", "applies to the engine's profile only",
                  "--exec runs the program once: pass light or full (and time the program "
                  "without ktune for the overhead)");
    }
    return {trace_level::Level::Light, trace_level::Level::Full};
  }
  throw_usage("--trace-level " + text, "is not a trace level",
              exec ? "use light (the default) or full" : "use light (the default), full or both");
}

// --trace-padding: auto (-1), off (0) or a number of untraced steps.
int64_t parse_trace_padding(const std::string& text) {
  if (text.empty() || text == "auto") return -1;
  if (text == "off") return 0;
  size_t used = 0;
  long long v = -1;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || v < 0 || v > 1'000'000) {
    throw_usage("--trace-padding " + text, "is not auto, off or a step count 0..1000000",
                "e.g. --trace-padding auto (the default), off, or 640");
  }
  return static_cast<int64_t>(v);
}

}  // namespace

void add_profile_command(CLI::App& app) {
  auto opt = std::make_shared<profiler::ProfileOptions>();
  auto exec = std::make_shared<profiler::ExecOptions>();
  auto exec_on = std::make_shared<bool>(false);
  auto duration = std::make_shared<std::string>();
  auto level = std::make_shared<std::string>();
  auto padding = std::make_shared<std::string>();
  opt->run.prompt = 32;
  opt->run.gen = 64;
  auto* sub = app.add_subcommand(
      "profile",
      "Profile the engine on a model and placement: where decode and prefill time goes (GPU\n"
      "idle, kernel gaps, launch latency, expert bandwidth per device, a per-token budget),\n"
      "written to profile.json, with a terminal report and verdict.\n"
      "Example: ktune profile --model synth:qwen3-30b-a3b:q4_0 --experts-on-gpu 24 -n 64 \\\n"
      "           --trace trace.json --report report.html -o profile.json\n"
      "Machine only: ktune profile --hardware -o machine.json\n"
      "Any CUDA program: ktune profile --exec [--duration 30s] -o p.json -- python3 run.py");
  auto* model = sub->add_option("-m,--model", opt->run.model, kModelHelp)->capture_default_str();
  sub->add_option("-c,--config", opt->run.configs, "Placement YAML to profile (one)");
  sub->add_option("--experts-on-gpu", opt->run.experts_on_gpu,
                  "Quick placement: attention on cuda:0, the experts of the first N layers on\n"
                  "cuda:0 and the rest on cpu");
  sub->add_option("--cuda-graph", opt->run.cuda_graph, "on|off (as for ktune run)");
  sub->add_option("--moe-kernel", opt->run.moe_kernel, "fused|unfused (as for ktune run)");
  sub->add_option("--cpu-handoff", opt->run.cpu_handoff,
                  "flags|host_node: hand-off of CPU experts (as for ktune run)");
  sub->add_option("--pcie-assist", opt->run.pcie_assist,
                  "off|SHARE: the GPU's share of the CPU experts, over PCIe (as for ktune run)");
  sub->add_option("--gpu-mem", opt->run.gpu_mem, "GPU memory budgets (as for ktune run)");
  sub->add_option("--cpu-mem", opt->run.cpu_mem, "Host memory budget (as for ktune run)");
  sub->add_option("-t,--threads", opt->run.threads,
                  "CPU threads (engine, or the CPU experts of a hybrid placement; --hardware:\n"
                  "a list of counts to measure)")
      ->delimiter(',');
  sub->add_option("-p,--prompt", opt->run.prompt, "Prefill tokens to profile (0 skips)")
      ->capture_default_str();
  sub->add_option("-n,--gen", opt->run.gen, "Decode tokens per window")->capture_default_str();
  sub->add_option("--batch", opt->run.batch,
                  "Sequences decoded together (1..32; CPU engine, or GPU placements on one\n"
                  "GPU): each decode step runs one token of each; tok/s and router statistics\n"
                  "count all of them")
      ->capture_default_str();
  sub->add_option("--warmup", opt->warmup, "Decode tokens before any measurement")
      ->capture_default_str();
  sub->add_option("--baseline-windows", opt->untraced_windows,
                  "Untraced decode windows measured for the overhead figure")
      ->capture_default_str();
  sub->add_option("--trace-level", *level,
                  "What CUPTI records in the traced window (docs/metrics.md \"Trace levels\"):\n"
                  "light (default): kernels, copies, memsets and the runtime calls (--exec: only\n"
                  "those that launch, copy or block) - every metric of the report, at the lowest\n"
                  "overhead; full: also every runtime API call, synchronizations, NVTX markers\n"
                  "and CUPTI's overhead records (the complete Chrome trace); both (engine only):\n"
                  "one decode window at each level, back to back, reporting the overhead of each");
  sub->add_option("--trace-padding", *padding,
                  "auto|off|N: untraced decode steps after the traced window, so that the\n"
                  "profiling run as a whole (traced window + padding) keeps the untraced speed.\n"
                  "Tracing slows the traced steps (CUPTI costs ~1-2 us per launch: ~30 % with\n"
                  "--cuda-graph off --moe-kernel unfused); every metric still comes from the n\n"
                  "traced steps. auto (default): none when the traced steps are within 2.5 % of\n"
                  "untraced, else enough to bring the run to 2.5 % (at most 16 x n steps, 20 s);\n"
                  "off: none; N: N steps. The report prints both overheads (docs/metrics.md)");
  sub->add_option("--trace", opt->trace, "Also write a Chrome trace (Perfetto, chrome://tracing)");
  sub->add_option("--report", opt->report, "Also write a self-contained HTML report");
  sub->add_option("-o,--output", opt->out, "profile.json to write")->capture_default_str();
  sub->add_flag("--hardware", opt->hardware,
                "Measure the machine alone (no model): bandwidths, launch/graph/host-node costs");
  sub->add_flag("--quick", opt->quick, "Smaller probes (fast, less precise; for tests)");
  sub->add_flag("-q,--quiet", opt->quiet, "No terminal report");
  sub->add_flag("--exec", *exec_on,
                "Profile the program given after -- (any CUDA program: PyTorch, llama.cpp, ...)\n"
                "through an injection library: GPU idle, gaps, launches, per-step and per-NVTX-\n"
                "range times (docs/exec.md)");
  sub->add_option("--duration", *duration,
                  "--exec: stop tracing this long after the program's first CUDA or NVTX call\n"
                  "(30s, 2m, 500ms), then stop the program");
  sub->add_option("--step-range", exec->step_range,
                  "--exec: the NVTX range that marks one step (default: the most repeated\n"
                  "top-level range)");
  sub->add_option("command", exec->command, "--exec: the program and its arguments, after --");
  sub->callback([opt, model, sub, exec, exec_on, duration, level, padding] {
    if (!padding->empty()) {
      if (*exec_on) {
        throw_usage("--trace-padding", "applies to the engine's profile only",
                    "--exec traces the program's whole run: drop --trace-padding");
      }
      if (opt->hardware) {
        throw_usage("--trace-padding", "applies to traced runs; --hardware traces nothing",
                    "drop --trace-padding, or profile a model");
      }
    }
    if (*exec_on) {
      if (model->count() > 0 || !opt->run.configs.empty() || opt->hardware) {
        throw_usage("--exec", "profiles another program, not ktune's engine",
                    "drop --model/--config/--hardware, or drop --exec");
      }
      if (exec->command.empty()) {
        throw_usage("--exec", "needs the program to run after --",
                    "ktune profile --exec -o p.json -- python3 script.py");
      }
      profiler::ExecOptions e = *exec;
      e.level = parse_trace_levels(*level, true).front();
      e.duration_s = duration->empty() ? 0 : parse_duration_s(*duration);
      e.out = opt->out;
      e.trace = opt->trace;
      e.report = opt->report;
      e.quiet = opt->quiet;
      e.command_line = "ktune profile --exec";
      if (!duration->empty()) e.command_line += " --duration " + *duration;
      if (!level->empty()) e.command_line += " --trace-level " + *level;
      if (!e.step_range.empty()) e.command_line += " --step-range " + e.step_range;
      e.command_line += " --";
      for (const std::string& a : e.command) e.command_line += " " + a;
      bool never_cuda = false;
      profiler::run_exec_profile(e, &never_cuda);
      return;
    }
    if (!exec->command.empty() || !duration->empty() || !exec->step_range.empty()) {
      throw_usage("--duration/--step-range/command", "only apply to --exec",
                  "add --exec to profile a program, or drop them");
    }
    profiler::ProfileOptions o = *opt;
    o.run.model_given = model->count() > 0;
    if (o.hardware && !level->empty()) {
      throw_usage("--trace-level", "applies to traced runs; --hardware traces nothing",
                  "drop --trace-level, or profile a model");
    }
    o.trace_levels = parse_trace_levels(*level, false);
    o.trace_padding = parse_trace_padding(*padding);
    o.command_line = "ktune profile";
    for (const std::string& a : sub->remaining()) o.command_line += " " + a;
    if (o.hardware && (o.run.model_given || !o.run.configs.empty())) {
      throw_usage("--hardware", "measures the machine without a model",
                  "drop --model/--config, or drop --hardware to profile the model");
    }
    profiler::run_profile(o);
  });
}

}  // namespace ktune::cli
