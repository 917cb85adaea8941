// `ktune info`: what a model is (shape, tensors, types, bytes) and what this build and host have.
#include <fmt/format.h>

#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "cli.h"
#include "ktune/engine/build_info.h"
#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/gpu_info.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/synthetic.h"
#include "ktune/engine/thread_pool.h"
#include "model_arg.h"

namespace ktune::cli {
namespace {

struct InfoOptions {
  std::string model;
  bool json = false;
};

void run_info(const InfoOptions& opt) {
  nlohmann::json doc = {{"ktune_version", build_version()},
                        {"commit", build_commit()},
                        {"cuda_backend", build_has_cuda()},
                        {"cpu", cpu_model_name()},
                        {"physical_cores", physical_core_count()},
                        {"cpu_kernels", cpu::isa_name(cpu::detect_isa())},
                        {"host_memory_bytes", host_memory_bytes()}};
  const GpuInfo gpus = query_gpus();
  doc["gpus"] = nlohmann::json::array();
  for (const auto& g : gpus.devices) {
    doc["gpus"].push_back({{"device", fmt::format("cuda:{}", g.index)},
                           {"name", g.name},
                           {"memory_bytes", g.total_bytes},
                           {"sm", fmt::format("{}.{}", g.sm_major, g.sm_minor)}});
  }
  if (gpus.devices.empty()) doc["gpu_unavailable"] = gpus.unavailable_reason;

  if (!opt.model.empty()) {
    // A synthetic model is described from its shape: building deepseek-v3 would take 700 GB.
    ModelWeights m = opt.model.rfind("synth:", 0) == 0
                         ? synthetic_model_shape(parse_synth_spec(opt.model))
                         : load_model_for_cli(opt.model, opt.json);
    const ModelConfig& c = m.cfg;
    std::map<std::string, int64_t> bytes_by_type;
    auto add = [&](const TensorView& t) { bytes_by_type[quant_name(t.type)] += t.nbytes(); };
    // Every tensor once (a tied output head is token_embd's bytes, counted once).
    std::set<const uint8_t*> seen;
    for (const TensorView* t : m.tensor_list()) {
      if (t->name.empty()) continue;  // a tensor this model does not have
      if (t->data == nullptr || seen.insert(t->data).second) add(*t);
    }
    doc["model"] = {{"source", m.source},
                    {"arch", c.arch},
                    {"layers", c.n_layers},
                    {"hidden", c.hidden},
                    {"heads", c.n_heads},
                    {"kv_heads", c.n_kv_heads},
                    {"head_dim", c.head_dim},
                    {"experts", c.n_experts},
                    {"experts_used", c.n_experts_used},
                    {"expert_ffn", c.expert_ffn},
                    {"vocab", c.vocab},
                    {"context_length", c.context_length},
                    {"rope_theta", c.rope_theta},
                    {"params_total", c.params_total()},
                    {"params_active", c.params_active_per_token()},
                    {"weight_bytes", m.weight_bytes()},
                    {"bytes_per_token_decode", m.bytes_per_token_decode()},
                    {"bytes_by_type", bytes_by_type}};
    if (c.is_deepseek2()) {
      doc["model"]["mla"] = {{"q_lora_rank", c.q_lora_rank},
                             {"kv_lora_rank", c.kv_lora_rank},
                             {"qk_nope_dim", c.qk_nope_dim()},
                             {"rope_dim", c.rope_dim},
                             {"v_head_dim", c.v_head_dim},
                             {"kv_cache_values_per_token_layer", c.kv_cache_values()}};
      doc["model"]["moe"] = {{"dense_leading_layers", c.n_dense_lead},
                             {"shared_experts", c.n_shared_experts},
                             {"gating", c.gating == ExpertGating::Sigmoid ? "sigmoid" : "softmax"},
                             {"selection_bias", c.expert_score_bias},
                             {"groups", c.n_expert_groups},
                             {"groups_used", c.n_groups_used},
                             {"weights_norm", c.norm_topk_prob},
                             {"weights_scale", c.expert_weights_scale}};
      doc["model"]["rope_scaling"] = c.rope_scaling == RopeScaling::Yarn
                                         ? nlohmann::json{{"type", "yarn"},
                                                          {"factor", c.rope_factor},
                                                          {"original_context", c.rope_orig_context},
                                                          {"mscale_all_dim", c.yarn_mscale_all_dim}}
                                         : nlohmann::json{{"type", "none"}};
    }
  }
  if (opt.json) {
    std::cout << doc.dump(2) << "\n";
    return;
  }
  std::cout << fmt::format("ktune {} ({}), CUDA backend: {}\n", build_version(), build_commit(),
                           build_has_cuda() ? "yes" : "no");
  std::cout << fmt::format("cpu: {}, {} physical cores, kernels {}, {} RAM\n", cpu_model_name(),
                           physical_core_count(), cpu::isa_name(cpu::detect_isa()),
                           format_bytes(static_cast<double>(host_memory_bytes())));
  for (const auto& g : gpus.devices) {
    std::cout << fmt::format("cuda:{}: {}, {}, sm_{}{}\n", g.index, g.name,
                             format_bytes(static_cast<double>(g.total_bytes)), g.sm_major,
                             g.sm_minor);
  }
  if (gpus.devices.empty()) std::cout << "gpu: " << gpus.unavailable_reason << "\n";
  if (doc.contains("model")) {
    const auto& mj = doc["model"];
    std::cout << fmt::format(
        "model: {} ({}), {} layers, hidden {}, heads {}/{} x {}, {} experts top-{} (ffn {}), "
        "vocab {}\n",
        mj["source"].get<std::string>(), mj["arch"].get<std::string>(), mj["layers"].get<int64_t>(),
        mj["hidden"].get<int64_t>(), mj["heads"].get<int64_t>(), mj["kv_heads"].get<int64_t>(),
        mj["head_dim"].get<int64_t>(), mj["experts"].get<int64_t>(),
        mj["experts_used"].get<int64_t>(), mj["expert_ffn"].get<int64_t>(),
        mj["vocab"].get<int64_t>());
    if (mj.contains("mla")) {
      const auto& a = mj["mla"];
      const auto& e = mj["moe"];
      const int64_t groups = e["groups"].get<int64_t>();
      std::cout << fmt::format(
          "  MLA: q_lora {}, kv_lora {}, head {} + rope {} (v {}); cache {} values per token and "
          "layer\n  {} dense leading layer(s), {} shared expert(s), {} routing{}{}, weights "
          "{}x{}\n",
          a["q_lora_rank"].get<int64_t>(), a["kv_lora_rank"].get<int64_t>(),
          a["qk_nope_dim"].get<int64_t>(), a["rope_dim"].get<int64_t>(),
          a["v_head_dim"].get<int64_t>(), a["kv_cache_values_per_token_layer"].get<int64_t>(),
          e["dense_leading_layers"].get<int64_t>(), e["shared_experts"].get<int64_t>(),
          e["gating"].get<std::string>(), e["selection_bias"].get<bool>() ? " with bias" : "",
          groups > 1
              ? fmt::format(" in the best {} of {} groups", e["groups_used"].get<int64_t>(), groups)
              : "",
          e["weights_norm"].get<bool>() ? "normalized " : "", e["weights_scale"].get<double>());
    }
    std::cout << fmt::format("params: {:.3f}B total, {:.3f}B active per token; weights {}, decode "
                             "reads {} per token\n",
                             mj["params_total"].get<int64_t>() / 1e9,
                             mj["params_active"].get<int64_t>() / 1e9,
                             format_bytes(mj["weight_bytes"].get<double>()),
                             format_bytes(mj["bytes_per_token_decode"].get<double>()));
    for (const auto& [type, bytes] : mj["bytes_by_type"].items()) {
      std::cout << fmt::format("  {:<5} {}\n", type, format_bytes(bytes.get<double>()));
    }
  }
}

}  // namespace

void add_info_command(CLI::App& app) {
  auto opt = std::make_shared<InfoOptions>();
  auto* sub = app.add_subcommand(
      "info",
      "Show this build, host and GPUs, and (with --model) a model's shape and sizes.\n"
      "Example: ktune info --model synth:qwen3-30b-a3b:q4_0");
  sub->add_option("-m,--model", opt->model, kModelHelp);
  sub->add_flag("--json", opt->json, "One JSON document on stdout");
  sub->callback([opt] { run_info(*opt); });
}

}  // namespace ktune::cli
