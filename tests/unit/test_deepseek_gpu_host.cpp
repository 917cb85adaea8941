// Host-side logic of the deepseek2 GPU engine, testable without a GPU: the memory planner's
// bytes for deepseek2 on a GPU (f32 latent cache, weights per device by placement, no batched
// prefill workspace or staging), CpuMoe on deepseek2 expert tensors (the CPU half of a hybrid
// layer), and the GpuEngine's refusals that come before it touches a device.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"
#include "ktune/engine/synthetic.h"
#include "ktune/engine/thread_pool.h"

namespace ktune {
namespace {

const ModelConfig& preset(const std::string& name) { return *find_preset(name); }

MemoryPlan plan(const ModelConfig& c, Placement p, int64_t context) {
  p.runtime.context = context;
  p.runtime.batch = 1;
  return plan_memory(c, QuantType::Q4_0, QuantType::Q4_0, p, Budgets{});
}

// The GPU engine keeps the latent cache in f32 (the CPU engine's numbers): 576 values x 4 bytes
// per position and layer; qwen3moe's GPU cache stays f16.
TEST(DeepseekGpuPlan, LatentCacheIsF32OnTheGpu) {
  const ModelConfig& v3 = preset("deepseek-v3");
  const MemoryPlan p = plan(v3, make_uniform_placement(v3, Device::cuda(0), Device::cuda(0)), 4096);
  EXPECT_EQ(p.per_device.at("cuda:0").kv_cache, int64_t{61} * 4096 * 576 * 4);
  const ModelConfig& q = preset("qwen3-30b-a3b");
  const MemoryPlan pq = plan(q, make_uniform_placement(q, Device::cuda(0), Device::cuda(0)), 4096);
  EXPECT_EQ(pq.per_device.at("cuda:0").kv_cache, int64_t{48} * 4096 * 2 * 4 * 128 * 2);
}

// Workspace on the GPU: no batched-prefill buffers or prefill staging (deepseek2 prefills token
// by token there), plus the MLA attention's partial sums: one row of scores per head and up to
// 64 spans x heads x (kv_lora_rank + 2) floats, so doubling the context from 4096 to 8192 adds
// 4 * 128 * 4096 bytes of scores and 16 more spans.
TEST(DeepseekGpuPlan, WorkspaceHasMlaSpansAndNoPrefillStaging) {
  const ModelConfig& v3 = preset("deepseek-v3");
  const Placement hybrid = make_layer_split(v3, 10, Device::cuda(0));
  const MemoryPlan a = plan(v3, hybrid, 4096), b = plan(v3, hybrid, 8192);
  const DeviceUse& ga = a.per_device.at("cuda:0");
  EXPECT_EQ(ga.staging, 0);
  EXPECT_EQ(b.per_device.at("cuda:0").workspace - ga.workspace,
            int64_t{4} * 128 * 4096 + int64_t{4} * 16 * 128 * 514);
  // qwen3moe's hybrid GPU stages CPU experts for its batched prefill.
  const ModelConfig& q = preset("qwen3-30b-a3b");
  EXPECT_GT(plan(q, make_layer_split(q, 10, Device::cuda(0)), 4096).per_device.at("cuda:0").staging,
            0);
}

// Weights by placement: everything of a layer but its routed experts goes with its attention
// (cuda:0); the routed experts where the placement puts them; dense layers have none.
TEST(DeepseekGpuPlan, WeightsPerDeviceFollowThePlacement) {
  const ModelConfig& v3 = preset("deepseek-v3");
  const WeightBytes wb = weight_bytes(v3, QuantType::Q4_0, QuantType::Q4_0);
  const MemoryPlan p = plan(v3, make_layer_split(v3, 5, Device::cuda(0)), 4096);
  int64_t gpu = wb.embedding + wb.head, cpu = 0;
  for (int64_t l = 0; l < v3.n_layers; ++l) {
    gpu += wb.attention[l];
    (l < 5 ? gpu : cpu) += wb.expert[l] * v3.n_experts;
  }
  EXPECT_EQ(wb.expert[0] + wb.expert[1] + wb.expert[2], 0);  // the three dense layers
  EXPECT_EQ(p.per_device.at("cuda:0").weights, gpu);
  EXPECT_EQ(p.per_device.at("cpu").weights, cpu);
  EXPECT_EQ(p.per_device.at("cpu").kv_cache, 0);
}

// CpuMoe on a deepseek2 model: the routed experts of a MoE layer as a float64 SwiGLU over the
// F32 weights (F32 weights: float activations, no quantization noise); dense layers are refused.
TEST(DeepseekCpuMoe, ComputesRoutedExpertsAndRefusesDenseLayers) {
  SynthOptions o;
  o.preset = "tiny-deepseek";
  o.quant = QuantType::F32;
  const ModelWeights m = make_synthetic_model(o);
  const ModelConfig& c = m.cfg;
  ThreadPool pool(2, false);
  CpuMoe moe(m, pool);
  std::mt19937 gen(11);
  std::normal_distribution<float> nd;
  std::vector<float> h(static_cast<size_t>(c.hidden)), y(h.size());
  for (auto& v : h) v = nd(gen);
  const std::vector<int32_t> ids = {3, 9, 14};
  const std::vector<float> wts = {0.7f, 0.4f, 1.1f};
  EXPECT_THROW(moe.compute(0, h.data(), ids.data(), wts.data(), 3, y.data()), Error);
  const int64_t layer = 1, H = c.hidden, F = c.expert_ffn;
  moe.compute(layer, h.data(), ids.data(), wts.data(), 3, y.data());
  const LayerWeights& L = m.layers[layer];
  auto at = [](const TensorView& t, int64_t e, int64_t r, int64_t col) {
    return double(reinterpret_cast<const float*>(t.matrix(e))[r * t.ne[0] + col]);
  };
  std::vector<double> ref(static_cast<size_t>(H), 0.0);
  for (size_t j = 0; j < ids.size(); ++j) {
    std::vector<double> a(static_cast<size_t>(F));
    for (int64_t r = 0; r < F; ++r) {
      double g = 0, u = 0;
      for (int64_t i = 0; i < H; ++i) {
        g += at(L.gate_exps, ids[j], r, i) * h[i];
        u += at(L.up_exps, ids[j], r, i) * h[i];
      }
      a[r] = g / (1.0 + std::exp(-g)) * u;
    }
    for (int64_t r = 0; r < H; ++r) {
      double d = 0;
      for (int64_t i = 0; i < F; ++i) d += at(L.down_exps, ids[j], r, i) * a[i];
      ref[r] += wts[j] * d;
    }
  }
  double mx = 0, err = 0;
  for (int64_t r = 0; r < H; ++r) {
    mx = std::max(mx, std::fabs(ref[r]));
    err = std::max(err, std::fabs(y[r] - ref[r]));
  }
  EXPECT_LE(err, 1e-5 * mx) << "max |y - ref| " << err << " of " << mx;
}

// GpuEngine picks the deepseek2 engine by architecture and checks what it cannot run before it
// looks for a GPU, so these refusals read the same on any machine.
TEST(DeepseekGpuEngine, RefusalsBeforeTouchingTheGpu) {
#if !defined(KTUNE_WITH_CUDA)
  GTEST_SKIP() << "built without CUDA (the GpuEngine refuses everything)";
#else
  SynthOptions o;
  o.preset = "tiny-deepseek";
  o.quant = QuantType::Q8_0;
  const ModelWeights m = make_synthetic_model(o);
  GpuEngineOptions split;
  split.layer_device = {0, 1, 1};
  try {
    GpuEngine e(m, split);
    ADD_FAILURE() << "a deepseek2 layer split was accepted";
  } catch (const Error& err) {
    EXPECT_NE(err.problem().find("deepseek2 models run on one GPU"), std::string::npos)
        << err.what();
    EXPECT_EQ(err.kind(), ErrorKind::Usage);
  }
  GpuEngineOptions bad_map;
  bad_map.expert_on_gpu.assign(2, std::vector<bool>(16, true));  // 2 of 3 layers
  EXPECT_THROW(GpuEngine(m, bad_map), Error);
  // F16 matrices: the GPU kernels take Q4_0, Q8_0, BF16 and F32; the error names a tensor.
  o.quant = QuantType::F16;
  const ModelWeights f16 = make_synthetic_model(o);
  try {
    GpuEngine e(f16, GpuEngineOptions{});
    ADD_FAILURE() << "F16 matrices were accepted";
  } catch (const Error& err) {
    EXPECT_NE(err.where().find(".weight"), std::string::npos) << err.what();
    EXPECT_NE(err.problem().find("F16"), std::string::npos) << err.what();
  }
#endif
}

}  // namespace
}  // namespace ktune
