// `ktune run`: flags -> RunOptions -> run_benchmark() (run_bench.cpp holds the work).
#include <algorithm>
#include <cctype>

#include "cli.h"
#include "ktune/engine/error.h"
#include "model_arg.h"
#include "run_bench.h"

namespace ktune::cli {

namespace {
bool is_count(const std::string& s) {
  return !s.empty() && s.size() < 19 &&
         std::all_of(s.begin(), s.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
}
}  // namespace

void add_run_command(CLI::App& app) {
  auto opt = std::make_shared<RunOptions>();
  auto prompt_args = std::make_shared<std::vector<std::string>>();
  auto prompt_texts = std::make_shared<std::vector<std::string>>();
  auto batches = std::make_shared<std::vector<int64_t>>();
  auto* sub = app.add_subcommand(
      "run",
      "Benchmark prefill and decode speed of a model on this machine (like llama-bench).\n"
      "Example: ktune run --model synth:qwen3-30b-a3b:q4_0 -p 512 -n 128 -r 5 --threads 8,16\n"
      "Placements: ktune run --config best.yaml,best-nograph.yaml  (one model load, one row per\n"
      "config and test), or ktune run --model M --experts-on-gpu 24 --cuda-graph on\n"
      "Text: ktune run --model Qwen3-30B-A3B-Q4_K_M.gguf --prompt \"The capital of France is\" -n 32");
  auto* model = sub->add_option("-m,--model", opt->model, kModelHelp)->capture_default_str();
  sub->add_option("-c,--config", opt->configs,
                  "Placement YAML(s) to run; a comma-separated list sweeps them with the model\n"
                  "loaded once (all must name the same model; --model overrides it)")
      ->delimiter(',');
  sub->add_option("--experts-on-gpu", opt->experts_on_gpu,
                  "Quick placement: attention of every layer on cuda:0, the experts of the first\n"
                  "N layers on cuda:0 and the rest on cpu (0 = all experts on cpu). A list\n"
                  "(0,12,24,48) sweeps them; --cuda-graph, --moe-kernel, --cpu-handoff and\n"
                  "--pcie-assist take lists too (on,off) and the run covers every combination,\n"
                  "model loaded once")
      ->delimiter(',');
  sub->add_option("--gpus", opt->gpus,
                  "Quick placement over the first N GPUs: layers split evenly (cuda:0 the first\n"
                  "layers), each layer's attention and experts on its GPU; with --experts-on-gpu K\n"
                  "only K layers keep their experts on the GPUs (spread evenly), the rest on cpu.\n"
                  "A list (1,2,4) sweeps")
      ->delimiter(',');
  sub->add_option("--gpu-transport", opt->gpu_transport,
                  "auto|nccl|peer[,...]: how activations move between GPUs with several GPUs\n"
                  "(overrides the YAML's runtime.gpu_transport; default auto: measured at load)");
  sub->add_option("--cuda-graph", opt->cuda_graph,
                  "on|off: capture the GPU decode step as a CUDA graph (overrides the YAML;\n"
                  "KTUNE_CUDA_GRAPH=0 forces off). Default: the placement's (on), off with\n"
                  "--moe-kernel unfused");
  sub->add_option("--moe-kernel", opt->moe_kernel,
                  "fused|unfused: the GPU MoE path (overrides the YAML; default fused)");
  sub->add_option("--cpu-handoff", opt->cpu_handoff,
                  "flags|host_node: how CPU experts are handed over in hybrid placements\n"
                  "(overrides the YAML; default flags: mapped-memory flags, a few us per layer;\n"
                  "host_node: cudaLaunchHostFunc pairs, as ktransformers does)");
  sub->add_option("--pcie-assist", opt->pcie_assist,
                  "off|SHARE: the GPU computes this share of each token's CPU experts (rounded\n"
                  "down, e.g. 0.375 = 3 of 8) reading their weights from host memory over PCIe,\n"
                  "while the CPU computes the rest (hybrid, fused MoE, one GPU; overrides the\n"
                  "YAML's runtime.pcie_assist; default off). A list (off,0.25,0.375) sweeps it");
  sub->add_option(
      "--gpu-mem", opt->gpu_mem,
      "GPU memory budgets for the plan: 70GiB (every GPU) or cuda:0=70GiB,cuda:1=20GiB\n"
      "(default: each GPU's memory less 256 MiB)");
  sub->add_option(
      "--cpu-mem", opt->cpu_mem,
      "Host memory budget for the plan, e.g. 100GiB (default: MemAvailable less 1 GiB)");
  sub->add_option("-p,--prompt", *prompt_args,
                  "N: prefill tokens per repetition (default 512; 0 skips). TEXT (anything but\n"
                  "a number): generate -n tokens from this text and print them (CPU engine;\n"
                  "repeat --prompt for several prompts, shared round-robin by --batch sequences)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  sub->add_option("--prompt-text", *prompt_texts,
                  "A text prompt, even one that looks like a number (as --prompt TEXT)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  sub->add_option("--batch", *batches,
                  "Sequences decoded together (1..32; a list sweeps, e.g. 1,4,16,32): tg decodes\n"
                  "B sequences per step (experts read once for all), reporting all sequences'\n"
                  "tok/s and per sequence; the KV cache is planned per sequence (for the\n"
                  "largest B). CPU engine, and GPU placements on one GPU (default 1)")
      ->delimiter(',');
  sub->add_option("-n,--gen", opt->gen, "Decode tokens per repetition; 0 skips")
      ->capture_default_str();
  sub->add_option("-r,--repetitions", opt->reps, "Timed repetitions (after one warm-up)")
      ->capture_default_str();
  sub->add_option("-t,--threads", opt->threads,
                  "CPU threads; a list sweeps (e.g. 8,16). Default: the placement's\n"
                  "runtime.cpu_threads, else one per physical core (CPU engine) or one fewer\n"
                  "(hybrid: the thread driving the GPU keeps a core)")
      ->delimiter(',');
  sub->add_flag("--json", opt->json, "Print one JSON document on stdout instead of the table");
  sub->add_flag("!--no-probe", opt->probe, "Skip the DRAM bandwidth probe (no % of limit)");
  sub->callback([opt, model, prompt_args, prompt_texts, batches] {
    RunOptions o = *opt;
    o.model_given = model->count() > 0;
    if (!batches->empty()) {
      o.batches = *batches;  // check_common refuses values outside 1..32
      o.batch = *std::max_element(batches->begin(), batches->end());
    }
    for (const std::string& p : *prompt_args) {
      if (p.size() > 1 && p[0] == '-' && is_count(p.substr(1))) {
        throw_usage("--prompt", "`" + p + "` is negative", "give -p N with N >= 0 (0 skips)");
      }
      if (is_count(p)) {
        if (prompt_args->size() > 1) {
          throw_usage("--prompt", "a token count (`" + p + "`) given with other prompts",
                      "give one -p N, or text prompts only");
        }
        o.prompt = std::stoll(p);
      } else {
        o.texts.push_back(p);
      }
    }
    o.texts.insert(o.texts.end(), prompt_texts->begin(), prompt_texts->end());
    run_benchmark(o);
  });
}

}  // namespace ktune::cli
