// `ktune profile`: flags -> ProfileOptions -> run_profile() (profiler/profile_run.cpp).
#include "cli.h"
#include "ktune/engine/error.h"
#include "model_arg.h"
#include "profiler/profile_run.h"

namespace ktune::cli {

void add_profile_command(CLI::App& app) {
  auto opt = std::make_shared<profiler::ProfileOptions>();
  opt->run.prompt = 32;
  opt->run.gen = 64;
  auto* sub = app.add_subcommand(
      "profile",
      "Profile the engine on a model and placement: where decode and prefill time goes (GPU\n"
      "idle, kernel gaps, launch latency, expert bandwidth per device, a per-token budget),\n"
      "written to profile.json, with a terminal report and verdict.\n"
      "Example: ktune profile --model synth:qwen3-30b-a3b:q4_0 --experts-on-gpu 24 -n 64 \\\n"
      "           --trace trace.json --report report.html -o profile.json\n"
      "Machine only: ktune profile --hardware -o machine.json");
  auto* model = sub->add_option("-m,--model", opt->run.model, kModelHelp)->capture_default_str();
  sub->add_option("-c,--config", opt->run.configs, "Placement YAML to profile (one)");
  sub->add_option("--experts-on-gpu", opt->run.experts_on_gpu,
                  "Quick placement: attention on cuda:0, the experts of the first N layers on\n"
                  "cuda:0 and the rest on cpu");
  sub->add_option("--cuda-graph", opt->run.cuda_graph, "on|off (as for ktune run)");
  sub->add_option("--moe-kernel", opt->run.moe_kernel, "fused|unfused (as for ktune run)");
  sub->add_option("--cpu-handoff", opt->run.cpu_handoff,
                  "flags|host_node: hand-off of CPU experts (as for ktune run)");
  sub->add_option("--gpu-mem", opt->run.gpu_mem, "GPU memory budgets (as for ktune run)");
  sub->add_option("--cpu-mem", opt->run.cpu_mem, "Host memory budget (as for ktune run)");
  sub->add_option("-t,--threads", opt->run.threads,
                  "CPU threads (engine, or the CPU experts of a hybrid placement; --hardware:\n"
                  "a list of counts to measure)")
      ->delimiter(',');
  sub->add_option("-p,--prompt", opt->run.prompt, "Prefill tokens to profile (0 skips)")
      ->capture_default_str();
  sub->add_option("-n,--gen", opt->run.gen, "Decode tokens per window")->capture_default_str();
  sub->add_option("--warmup", opt->warmup, "Decode tokens before any measurement")
      ->capture_default_str();
  sub->add_option("--baseline-windows", opt->untraced_windows,
                  "Untraced decode windows measured for the overhead figure")
      ->capture_default_str();
  sub->add_option("--trace", opt->trace, "Also write a Chrome trace (Perfetto, chrome://tracing)");
  sub->add_option("--report", opt->report, "Also write a self-contained HTML report");
  sub->add_option("-o,--output", opt->out, "profile.json to write")->capture_default_str();
  sub->add_flag("--hardware", opt->hardware,
                "Measure the machine alone (no model): bandwidths, launch/graph/host-node costs");
  sub->add_flag("--quick", opt->quick, "Smaller probes (fast, less precise; for tests)");
  sub->add_flag("-q,--quiet", opt->quiet, "No terminal report");
  sub->callback([opt, model, sub] {
    profiler::ProfileOptions o = *opt;
    o.run.model_given = model->count() > 0;
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
