// The multi-GPU layer split as a plan (ktune/engine/gpu_stages.h): pure C++, no CUDA.
#include "ktune/engine/gpu_stages.h"

#include <algorithm>
#include <map>
#include <set>

#include "ktune/engine/error.h"

namespace ktune {

const char* gpu_transport_name(GpuTransport t) {
  switch (t) {
    case GpuTransport::Nccl:
      return "nccl";
    case GpuTransport::Peer:
      return "peer";
    default:
      return "auto";
  }
}

GpuTransport parse_gpu_transport(const std::string& text, const std::string& where) {
  if (text == "auto") return GpuTransport::Auto;
  if (text == "nccl") return GpuTransport::Nccl;
  if (text == "peer") return GpuTransport::Peer;
  throw Error(where, "`" + text + "` is not a GPU transport", "use auto, nccl or peer",
              ErrorKind::Usage);
}

std::vector<int> GpuStagePlan::devices() const {
  std::vector<int> d;
  for (const GpuStage& s : stages) d.push_back(s.device);
  return d;
}

namespace {

std::string layer_range(int64_t first, int64_t end) {
  return end - first == 1 ? "layer " + std::to_string(first)
                          : "layers " + std::to_string(first) + "-" + std::to_string(end - 1);
}

}  // namespace

std::string GpuStagePlan::describe() const {
  std::string s;
  for (const GpuStage& st : stages) {
    s += (s.empty() ? "" : " -> ") + Device::cuda(st.device).to_string() + " " +
         layer_range(st.first_layer, st.end_layer);
  }
  return s;
}

GpuStagePlan plan_gpu_stages(const std::vector<int>& layer_device, const std::string& where) {
  if (layer_device.empty()) {
    throw Error(where, "a model without layers has nothing to split over GPUs",
                "use a model with at least one layer");
  }
  GpuStagePlan plan;
  plan.stage_of_layer.resize(layer_device.size());
  const int64_t n = static_cast<int64_t>(layer_device.size());
  for (int64_t l = 0; l < n; ++l) {
    const int dev = layer_device[static_cast<size_t>(l)];
    if (dev < 0) {
      throw Error(where, "layer " + std::to_string(l) + " has no GPU (device " +
                             std::to_string(dev) + ")",
                  "give every layer's attention a cuda:N device");
    }
    if (plan.stages.empty() || plan.stages.back().device != dev) {
      for (const GpuStage& s : plan.stages) {
        if (s.device != dev) continue;
        throw Error(where,
                    Device::cuda(dev).to_string() + " runs " +
                        layer_range(s.first_layer, s.end_layer) + " and again layer " +
                        std::to_string(l) + ", with other GPUs in between",
                    "give each GPU one contiguous range of layers (e.g. cuda:0 layers 0-23, "
                    "cuda:1 layers 24-47)");
      }
      if (!plan.stages.empty()) plan.transfer_after.push_back(l - 1);
      GpuStage s;
      s.device = dev;
      s.first_layer = l;
      s.end_layer = l;
      plan.stages.push_back(s);
    }
    plan.stages.back().end_layer = l + 1;
    plan.stage_of_layer[static_cast<size_t>(l)] = static_cast<int>(plan.stages.size()) - 1;
  }
  plan.stages.front().embedding = true;
  plan.stages.back().head = true;
  return plan;
}

GpuStagePlan plan_gpu_stages(const Placement& p, const std::string& where) {
  if (!p.resolved()) {
    throw Error(where, "the placement is not resolved against a model",
                "resolve it before planning GPU stages");
  }
  std::vector<int64_t> cpu_attention;
  for (int64_t l = 0; l < p.n_layers(); ++l) {
    if (!p.layers[static_cast<size_t>(l)].attention.is_gpu()) cpu_attention.push_back(l);
  }
  if (!cpu_attention.empty()) {
    throw Error(where,
                "the GPU engine needs every layer's attention on a GPU, but layers " +
                    format_id_ranges(cpu_attention) + " have it on the CPU",
                "put every layer's attention on a cuda:N device (experts may stay on cpu), or "
                "run everything on cpu");
  }
  // Layers whose GPU experts sit on a GPU other than their attention's, grouped by the pair.
  std::map<std::pair<Device, Device>, std::vector<int64_t>> bad;
  for (int64_t l = 0; l < p.n_layers(); ++l) {
    const LayerPlacement& lp = p.layers[static_cast<size_t>(l)];
    std::set<Device> other;
    for (const Device& d : lp.experts) {
      if (d.is_gpu() && d != lp.attention) other.insert(d);
    }
    for (const Device& d : other) bad[{lp.attention, d}].push_back(l);
  }
  if (!bad.empty()) {
    const auto& [pair, layers] = *bad.begin();
    throw Error(where,
                "layers " + format_id_ranges(layers) + " run attention on " +
                    pair.first.to_string() + " but have experts on " + pair.second.to_string() +
                    (bad.size() > 1 ? " (and " + std::to_string(bad.size() - 1) +
                                          " more such device pairs)"
                                    : std::string()),
                "put a layer's GPU experts on the GPU that runs its attention (" +
                    pair.first.to_string() + ") or on cpu");
  }
  return plan_gpu_stages(layer_devices(p), where);
}

std::vector<int> layer_devices(const Placement& p) {
  std::vector<int> d;
  for (const LayerPlacement& lp : p.layers) d.push_back(lp.attention.is_gpu() ? lp.attention.index : -1);
  return d;
}

std::vector<std::vector<bool>> experts_on_gpu_map(const Placement& p) {
  std::vector<std::vector<bool>> m;
  for (const LayerPlacement& lp : p.layers) {
    std::vector<bool> row;
    for (const Device& d : lp.experts) row.push_back(d.is_gpu());
    m.push_back(std::move(row));
  }
  return m;
}

Placement make_gpu_split(const ModelConfig& cfg, int n_gpus, int64_t gpu_expert_layers) {
  if (n_gpus < 1 || n_gpus > cfg.n_layers || n_gpus > 1024) {
    throw Error("--gpus", std::to_string(n_gpus) + " GPUs for a model of " +
                              std::to_string(cfg.n_layers) + " layers",
                "give 1.." + std::to_string(std::min<int64_t>(cfg.n_layers, 1024)) + " GPUs",
                ErrorKind::Usage);
  }
  if (gpu_expert_layers < 0 || gpu_expert_layers > cfg.n_layers) {
    throw Error("--experts-on-gpu", std::to_string(gpu_expert_layers) + " layers is out of range",
                "the model has " + std::to_string(cfg.n_layers) + " layers; give 0 to " +
                    std::to_string(cfg.n_layers),
                ErrorKind::Usage);
  }
  Placement p = make_uniform_placement(cfg, Device::cuda(0), Device::cpu());
  const int64_t per = cfg.n_layers / n_gpus, extra = cfg.n_layers % n_gpus;
  const int64_t k_per = gpu_expert_layers / n_gpus, k_extra = gpu_expert_layers % n_gpus;
  int64_t l = 0, left = gpu_expert_layers;
  for (int g = 0; g < n_gpus; ++g) {
    const int64_t count = per + (g < extra ? 1 : 0);
    int64_t with_experts = std::min(count, k_per + (g < k_extra ? 1 : 0));
    with_experts = std::min(with_experts, left);
    left -= with_experts;
    const Device gpu = Device::cuda(g);
    for (int64_t i = 0; i < count; ++i, ++l) {
      LayerPlacement& lp = p.layers[static_cast<size_t>(l)];
      lp.attention = gpu;
      if (i < with_experts) std::fill(lp.experts.begin(), lp.experts.end(), gpu);
    }
  }
  // Layers a short GPU range could not take (K close to n_layers with uneven ranges): the
  // remaining GPU-expert layers go to the first layers still on the CPU, on their own GPU.
  for (size_t i = 0; i < p.layers.size() && left > 0; ++i) {
    LayerPlacement& lp = p.layers[i];
    if (lp.experts.empty() || lp.experts.front().is_gpu()) continue;
    std::fill(lp.experts.begin(), lp.experts.end(), lp.attention);
    --left;
  }
  return p;
}

}  // namespace ktune
