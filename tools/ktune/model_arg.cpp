#include "model_arg.h"

#include <fmt/format.h>

#include <cstdio>

#include "cli.h"
#include "ktune/engine/build_info.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/thread_pool.h"

namespace ktune::cli {

const char* const kModelHelp =
    "Model: a GGUF file, a Hugging Face checkpoint folder (config.json + *.safetensors), or\n"
    "synth:PRESET[:QUANT] for a random-weight model built in memory (presets: tiny,\n"
    "qwen3-30b-a3b, qwen3-235b-a22b, tiny-deepseek, deepseek-v2-lite, deepseek-v3; quants: f32\n"
    "f16 bf16 q8_0 q4_0 q4_k q5_k q6_k, or the per-tensor mixes q4_k_m q5_k_m)";

ModelWeights load_model_for_cli(const std::string& spec, bool quiet) {
  const double t0 = now_seconds();
  ModelWeights m = load_model(spec);
  const double dt = now_seconds() - t0;
  if (!quiet && dt > 1.0) {
    std::fprintf(stderr, "ktune: loaded %s (%s) in %.1f s\n", spec.c_str(),
                 format_bytes(static_cast<double>(m.weight_bytes())).c_str(), dt);
  }
  return m;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  return fmt::format("{:.{}f} {}", bytes, u == 0 ? 0 : 1, units[u]);
}

std::string format_count(double n) {
  if (n >= 1e9) return fmt::format("{:.2f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.1f}K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

nlohmann::json report_header(const ModelWeights& model, int threads, const std::string& isa) {
  const ModelConfig& c = model.cfg;
  return {
      {"ktune_version", build_version()},
      {"commit", build_commit()},
      {"cpu", cpu_model_name()},
      {"physical_cores", physical_core_count()},
      {"isa", isa},
      {"threads", threads},
      {"model", model.source},
      {"arch", c.arch},
      {"quant", quant_name(model.quant)},
      {"params_total", c.params_total()},
      {"params_active", c.params_active_per_token()},
      {"weight_bytes", model.weight_bytes()},
      {"bytes_per_token_decode", model.bytes_per_token_decode()},
  };
}

}  // namespace ktune::cli
