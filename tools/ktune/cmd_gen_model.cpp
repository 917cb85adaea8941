// `ktune gen-model`: writes a deterministic random-weight GGUF of a preset's real shape.
#include <fmt/format.h>

#include <iostream>

#include "cli.h"
#include "ktune/engine/error.h"
#include "ktune/engine/synthetic.h"

namespace ktune::cli {
namespace {

struct GenModelOptions {
  std::string preset = "tiny";
  std::string quant = "q8_0";
  uint64_t seed = 1;
  std::string skew = "none";
  std::string output;
  bool quiet = false;
};

void run_gen_model(const GenModelOptions& opt) {
  SynthOptions so;
  so.preset = opt.preset;
  set_synth_quant(so, opt.quant, "--quant");
  so.seed = opt.seed;
  so.zipf_s = parse_router_skew(opt.skew, "--router-skew");
  if (!find_preset(so.preset)) {
    std::string names;
    for (const auto& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
    throw_usage("--preset", "unknown preset '" + opt.preset + "'", "use one of: " + names);
  }
  remove_stale_temp_files(opt.output, opt.quiet);
  Progress progress("ktune: writing " + opt.output, !opt.quiet);
  write_synthetic_gguf(so, opt.output,
                       [&](uint64_t done, uint64_t total) { progress.update(done, total); });
  progress.finish();
  if (!opt.quiet) std::cout << opt.output << "\n";
}

}  // namespace

void add_gen_model_command(CLI::App& app) {
  auto opt = std::make_shared<GenModelOptions>();
  auto* sub = app.add_subcommand(
      "gen-model",
      "Write a random-weight GGUF of a real model's shape (deterministic, streaming, atomic).\n"
      "It loads in ktune and in llama.cpp-family tools (no vocabulary: tokenizer 'no_vocab').\n"
      "Example: ktune gen-model --preset qwen3-30b-a3b --quant q4_0 --seed 1 "
      "--router-skew zipf:1.1 -o q30b.gguf");
  sub->add_option(
         "--preset", opt->preset,
         "tiny, qwen3-30b-a3b, qwen3-235b-a22b, tiny-deepseek, deepseek-v2-lite or deepseek-v3")
      ->capture_default_str();
  sub->add_option("--quant", opt->quant,
                  "Type of the large matrices: f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k, "
                  "or llama.cpp's per-tensor mix q4_k_m / q5_k_m (the types `ktune quantize "
                  "--mixed` gives; case-insensitive)")
      ->capture_default_str();
  // CLI11 reads "-1" as 2^64-1 and saturates values beyond 64 bits, so two different seeds
  // could silently give the same bytes: only whole numbers 0..2^64-1 are seeds.
  sub->add_option("--seed", opt->seed, "Random seed; same seed, same bytes")
      ->capture_default_str()
      ->check(
          [](const std::string& v) -> std::string {
            const bool digits = !v.empty() && v.size() <= 20 &&
                                v.find_first_not_of("0123456789") == std::string::npos;
            if (digits && (v.size() < 20 || v <= "18446744073709551615")) return "";
            return "`" + v + "` is not a whole number from 0 to 18446744073709551615";
          },
          "SEED");
  sub->add_option("--router-skew", opt->skew,
                  "Expert popularity per layer: none, or zipf:S (Zipf law of exponent S)")
      ->capture_default_str();
  sub->add_option("-o,--output", opt->output, "Output GGUF file")->required();
  sub->add_flag("-q,--quiet", opt->quiet, "No progress on stderr");
  sub->callback([opt] { run_gen_model(*opt); });
}

}  // namespace ktune::cli
