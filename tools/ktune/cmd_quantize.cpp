// `ktune quantize`: re-quantizes a GGUF model (one file or a split set) into one GGUF file.
#include <fmt/format.h>

#include <iostream>

#include "cli.h"
#include "ktune/engine/error.h"
#include "ktune/engine/quantize.h"

namespace ktune::cli {
namespace {

struct QuantizeCliOptions {
  std::string input, output, type, mixed;
  int threads = 0;
  bool quiet = false;
};

void run_quantize(const QuantizeCliOptions& o) {
  QuantizeOptions opt;
  opt.threads = o.threads;
  if (!o.mixed.empty()) {
    const auto mix = parse_quant_mix(o.mixed);
    if (!mix) throw_usage("--mixed", "unknown mix '" + o.mixed + "'", "use q4_k_m or q5_k_m");
    opt.mix = *mix;
    opt.type = quant_mix_base(*mix);
    if (!o.type.empty() && parse_quant_or_throw(o.type, "--type") != opt.type) {
      throw_usage("--type", "--mixed " + o.mixed + " has base type " + quant_name(opt.type) +
                                ", not " + o.type,
                  "leave --type out with --mixed, or pass the mix's own base type");
    }
  } else if (o.type.empty()) {
    throw_usage("--type", "no target type", "pass --type q4_k (or q5_k, q6_k, q8_0, ...) or "
                                            "--mixed q4_k_m");
  } else {
    opt.type = parse_quant_or_throw(o.type, "--type");
  }
  if (o.input == o.output) {
    throw_usage(o.output, "the output would replace the input",
                "write to another file (the input is read while the output is written)");
  }
  remove_stale_temp_files(o.output, o.quiet);
  Progress progress("ktune: quantizing to " + o.output, !o.quiet);
  const QuantizeReport r = quantize_gguf(
      o.input, o.output, opt, [&](uint64_t done, uint64_t total) { progress.update(done, total); });
  progress.finish();
  if (!o.quiet) {
    std::string types;
    for (const auto& [name, n] : r.tensors_by_type) {
      types += (types.empty() ? "" : ", ") + fmt::format("{} {}", n, name);
    }
    const bool big = r.bytes_in >= (uint64_t{1} << 30);
    const double unit = big ? 1073741824.0 : 1048576.0;
    std::cerr << fmt::format("ktune: {} tensors ({}), {:.2f} {} -> {:.2f} {}\n", r.tensors, types,
                             r.bytes_in / unit, big ? "GiB" : "MiB", r.bytes_out / unit,
                             big ? "GiB" : "MiB");
    if (r.requantized > 0) {
      std::cerr << fmt::format(
          "ktune: note: {} tensors were already quantized and were quantized again, which adds "
          "the errors of both; quantize from the F16/BF16/F32 model when you have it\n",
          r.requantized);
    }
  }
  std::cout << o.output << "\n";
}

}  // namespace

void add_quantize_command(CLI::App& app) {
  auto opt = std::make_shared<QuantizeCliOptions>();
  auto* sub = app.add_subcommand(
      "quantize",
      "Re-quantize a GGUF model into one GGUF file (streaming, all cores, atomic output).\n"
      "Norms, biases and the MoE router keep their type; every other tensor gets --type, or with\n"
      "--mixed, llama.cpp's mix: q4_k_m = Q4_K with Q6_K for the output head and for attn_v and\n"
      "ffn_down in the first and last eighth of the layers and every third layer between\n"
      "(8-expert models: attn_k/attn_v Q8_0, attn_output Q5_K); q5_k_m the same over Q5_K.\n"
      "Rows that are not a whole number of the type's blocks fall back to Q8_0 or F16.\n"
      "Types: q4_k (4.5 bits/weight), q5_k (5.5), q6_k (6.56), q8_0 (8.5), q4_0 (4.5), f16, bf16.\n"
      "A split model (NAME-00001-of-0000N.gguf ...) is read from its first part.\n"
      "Examples:\n"
      "  ktune gen-model --preset qwen3-30b-a3b --quant f16 -o q30b-f16.gguf\n"
      "  ktune quantize q30b-f16.gguf q30b-q4_k_m.gguf --mixed q4_k_m\n"
      "  ktune quantize model-00001-of-00003.gguf model-q6_k.gguf --type q6_k");
  sub->add_option("input", opt->input, "GGUF model to read (first part of a split model)")
      ->required();
  sub->add_option("output", opt->output, "GGUF file to write")->required();
  sub->add_option("--type", opt->type,
                  "Target type of the matrices: q4_k, q5_k, q6_k, q8_0, q4_0, f16, bf16, f32");
  sub->add_option("--mixed", opt->mixed, "A per-tensor mix instead of one type: q4_k_m, q5_k_m");
  sub->add_option("--threads", opt->threads, "Threads (default: one per physical core)")
      ->check(CLI::Range(1, 4096));
  sub->add_flag("-q,--quiet", opt->quiet, "No progress or summary on stderr");
  sub->callback([opt] { run_quantize(*opt); });
}

}  // namespace ktune::cli
