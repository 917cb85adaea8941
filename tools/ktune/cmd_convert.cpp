// `ktune convert`: a Hugging Face checkpoint folder (config.json + safetensors) to GGUF with
// llama.cpp's tensor names.
#include <iostream>

#include "cli.h"
#include "ktune/engine/hf_checkpoint.h"

namespace ktune::cli {
namespace {

struct ConvertOptions {
  std::string dir;
  std::string output;
  std::string quant = "f32";
  bool quiet = false;
};

void run_convert(const ConvertOptions& opt) {
  const QuantType q = parse_quant_or_throw(opt.quant, "--quant");
  remove_stale_temp_files(opt.output, opt.quiet);
  Progress progress("ktune: writing " + opt.output, !opt.quiet);
  convert_hf_to_gguf(opt.dir, opt.output, q,
                     [&](uint64_t done, uint64_t total) { progress.update(done, total); });
  progress.finish();
  if (!opt.quiet) std::cout << opt.output << "\n";
}

}  // namespace

void add_convert_command(CLI::App& app) {
  auto opt = std::make_shared<ConvertOptions>();
  auto* sub = app.add_subcommand(
      "convert",
      "Convert a Hugging Face Qwen3-MoE checkpoint folder to GGUF (llama.cpp tensor names).\n"
      "Example: ktune convert ./Qwen3-30B-A3B -o q30b-q8.gguf --quant q8_0");
  sub->add_option("dir", opt->dir, "Checkpoint folder with config.json and *.safetensors")
      ->required();
  sub->add_option("-o,--output", opt->output, "Output GGUF file")->required();
  sub->add_option("--quant", opt->quant, "Type of the large matrices: f32 f16 bf16 q8_0 q4_0")
      ->capture_default_str();
  sub->add_flag("-q,--quiet", opt->quiet, "No progress on stderr");
  sub->callback([opt] { run_convert(*opt); });
}

}  // namespace ktune::cli
