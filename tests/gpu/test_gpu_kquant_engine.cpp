// The GPU engine on a model that mixes tensor types per tensor the way llama.cpp's Q4_K_M files
// do: synth:tiny:q4_k_m (`ktune quantize --mixed q4_k_m`'s choices for tiny: Q4_K token_embd,
// attn_q and gate/up experts; Q5_K attn_output and Q8_0 attn_k/attn_v (llama.cpp's 8-expert
// rules); Q6_K ffn_down of layers 2-3 (the "more bits" layers) and the output head; Q4_K ffn_down
// elsewhere). On the device (ctest label `gpu`; skipped with query_gpus()'s reason without one).
//
//   GpuKQuantEngine.DecodeMatchesCpuEngine    logits of 6 decode steps against CpuEngine, for
//       all experts on the GPU and a hybrid placement (even expert ids on the GPU), each with the
//       fused and the unfused MoE, graph off and on; within each placement the four runs are
//       bit-identical (same row dots, same sums).
//   GpuKQuantEngine.GreedyTokensMatchCpuEngine  16 greedy tokens chosen on the device, the same
//       in every configuration of a placement; the CPU engine, teacher-forced with them, picks
//       the same token at every step but near-ties (a gap within the logit tolerance), at most 2.
//   GpuKQuantEngine.LegacyStepMatchesFused    KTUNE_GPU_LEGACY=1 (one launch per op,
//       launch_matvec's K-quant kernels) against the fused step.
//   GpuKQuantPrefill.*                        batched prefill (K-quant tensor-core matmul)
//       against CpuEngine::prefill and the engine's own decode steps; staged CPU experts
//       (hybrid) bit-identical to all-GPU; decode continues after it, graph on.
//   GpuKQuantEngine.DeviceBytesWithinPlan     the memory planner's bytes for this model cover
//       what the engine allocates.
//   GpuKQuantEngine.UnsupportedTypesRefused   F16 matrices: an error naming the tensor and type.
//
// Tolerance against the CPU engine (test_gpu_engine.cpp's rule): the CPU quantizes every
// matvec's activations (Q8_K per 256 values for the K-quant matrices, Q8_0 per 32 for the Q8_0
// ones), the GPU keeps them float32 (fp16 KV cache). e1 = the larger relative RMS error of the
// output head's dots under either activation format; max|gpu - cpu| <= 4 e1 sqrt(1 + 5 layers)
// max|cpu logit| (floor 1%), one step in a run allowed up to 4x (a router near-tie on the CPU's
// quantized activations moves every later logit).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gpu/engine_test_util.h"
#include "gpu/gpu_test_util.h"
#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/placement.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/synthetic.h"

namespace ktune {
namespace {

using test::Split;

const ModelWeights& mixed() {
  static const ModelWeights m = [] {
    SynthOptions o;
    o.preset = "tiny";
    o.seed = 1;
    set_synth_quant(o, "q4_k_m", "test");
    return make_synthetic_model(o);
  }();
  return m;
}

struct ScopedEnv {
  std::string name;
  ScopedEnv(const char* n, const char* v) : name(n) { setenv(n, v, 1); }
  ~ScopedEnv() { unsetenv(name.c_str()); }
};

const std::vector<int32_t> kTokens = {1, 17, 300, 5, 999, 42};

// Relative RMS error of the output head's dots when x is quantized to `act` (Q8_0 or Q8_K), on
// random normal x and the model's own head rows.
double activation_noise(const ModelWeights& m, QuantType act) {
  const TensorView& w = m.output.data ? m.output : m.tok_embd;
  const int64_t n = w.row_len();
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(n)), xq(x.size()), row(x.size());
  std::vector<uint8_t> q(static_cast<size_t>(row_bytes(act, n)));
  double se = 0, sr = 0;
  for (int trial = 0; trial < 4; ++trial) {
    for (auto& v : x) v = nd(gen);
    quantize_row(act, x.data(), q.data(), n);
    dequantize_row(act, q.data(), xq.data(), n);
    for (int64_t r = 0; r < std::min<int64_t>(w.n_rows(), 256); ++r) {
      dequantize_row(w.type, w.row(r), row.data(), n);
      double a = 0, b = 0;
      for (int64_t c = 0; c < n; ++c) {
        a += double(row[c]) * x[c];
        b += double(row[c]) * xq[c];
      }
      se += (a - b) * (a - b);
      sr += a * a;
    }
  }
  return std::sqrt(se / sr);
}

double cpu_tolerance(const ModelWeights& m, double* e1_out = nullptr) {
  const double e1 =
      std::max(activation_noise(m, QuantType::Q8_0), activation_noise(m, QuantType::Q8_K));
  if (e1_out) *e1_out = e1;
  return std::max(0.01, 4.0 * e1 * std::sqrt(1.0 + 5.0 * static_cast<double>(m.cfg.n_layers)));
}

CpuEngineOptions cpu_opt() {
  CpuEngineOptions co;
  co.threads = 4;
  co.max_context = 64;
  co.pin_threads = false;
  return co;
}

GpuEngineOptions gpu_opt(const ModelWeights& m, Split split, MoeKernel k, bool graph) {
  GpuEngineOptions o{64, graph, k};
  o.max_prefill_chunk = 16;
  if (split != Split::AllOnGpu) {
    o.cpu_threads = 3;
    o.pin_threads = false;
    o.expert_on_gpu = test::expert_map(m.cfg, split);
  }
  return o;
}

std::string config_name(Split split, MoeKernel k, bool graph) {
  return std::string(split == Split::AllOnGpu ? "all on gpu" : test::split_name(split)) + ", " +
         moe_kernel_name(k) + ", graph " + (graph ? "on" : "off");
}

std::vector<std::vector<float>> gpu_logits(const ModelWeights& m, const GpuEngineOptions& o) {
  GpuEngine e(m, o);
  std::vector<std::vector<float>> out;
  for (int32_t t : kTokens) {
    out.emplace_back();
    e.decode(t, &out.back());
  }
  return out;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& ref) {
  double mx = 0, err = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    mx = std::max(mx, double(std::fabs(ref[i])));
    err = std::max(err, double(std::fabs(a[i] - ref[i])));
  }
  return err / mx;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

TEST(GpuKQuantEngine, DecodeMatchesCpuEngine) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = mixed();
  // The mix this file is about: every K-quant type, a Q8_0 matrix, q/k/v of different types and
  // a layer whose gate/up and down types differ.
  std::map<QuantType, int> types;
  for (const TensorView* t : m.tensor_list()) ++types[t->type];
  for (QuantType t : {QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K, QuantType::Q8_0}) {
    EXPECT_GT(types[t], 0) << quant_name(t);
  }
  EXPECT_NE(m.layers[0].wq.type, m.layers[0].wv.type);
  EXPECT_NE(m.layers[3].gate_exps.type, m.layers[3].down_exps.type);

  CpuEngine cpu(m, cpu_opt());
  std::vector<std::vector<float>> ref;
  for (int32_t t : kTokens) {
    ref.emplace_back();
    cpu.decode(t, &ref.back());
  }
  double e1 = 0;
  const double tol = cpu_tolerance(m, &e1);
  std::printf("[GpuKQuantEngine] activation noise e1 %.4f%% -> tolerance %.3f%% of max|logit|\n",
              100 * e1, 100 * tol);
  for (Split split : {Split::AllOnGpu, Split::EvenOnGpu}) {
    std::vector<std::vector<float>> first;
    for (MoeKernel k : {MoeKernel::Fused, MoeKernel::Unfused}) {
      for (bool graph : {false, true}) {
        const std::string name = config_name(split, k, graph);
        SCOPED_TRACE(name);
        const auto got = gpu_logits(m, gpu_opt(m, split, k, graph));
        int outliers = 0;
        double worst = 0;
        for (size_t s = 0; s < kTokens.size(); ++s) {
          const double rel = rel_diff(got[s], ref[s]);
          worst = std::max(worst, rel);
          if (rel > tol) {
            ++outliers;
            EXPECT_LE(rel, 4 * tol) << "step " << s;
          }
        }
        EXPECT_LE(outliers, 1);
        bool identical = true;
        if (first.empty()) {
          first = got;
        } else {
          for (size_t s = 0; s < got.size(); ++s)
            identical = identical && same_bits(got[s], first[s]);
          EXPECT_TRUE(identical) << "differs from the fused, graph-off run of this placement";
        }
        std::printf(
            "[GpuKQuantEngine %s] worst |gpu-cpu| %.4f%% of max|logit|; = first run of "
            "the placement bit for bit: %s\n",
            name.c_str(), 100 * worst, identical ? "yes" : "no");
      }
    }
  }
}

TEST(GpuKQuantEngine, GreedyTokensMatchCpuEngine) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = mixed();
  const double tol = cpu_tolerance(m);
  constexpr int64_t kSteps = 16;
  for (Split split : {Split::AllOnGpu, Split::EvenOnGpu}) {
    std::vector<int32_t> first;
    for (MoeKernel k : {MoeKernel::Fused, MoeKernel::Unfused}) {
      for (bool graph : {false, true}) {
        GpuEngine e(m, gpu_opt(m, split, k, graph));
        const auto toks = e.generate_greedy(3, kSteps);
        ASSERT_EQ(toks.size(), static_cast<size_t>(kSteps));
        if (first.empty()) first = toks;
        EXPECT_EQ(toks, first) << config_name(split, k, graph);
      }
    }
    // The CPU engine fed the same tokens (teacher forcing: one mismatch cannot derail the rest).
    CpuEngine cpu(m, cpu_opt());
    std::vector<float> lg;
    int32_t in = 3;
    int mismatches = 0;
    std::string line;
    for (int64_t i = 0; i < kSteps; ++i) {
      cpu.decode(in, &lg);
      const int32_t c = CpuEngine::argmax(lg.data(), static_cast<int64_t>(lg.size()));
      const int32_t g = first[static_cast<size_t>(i)];
      line += std::to_string(g) + (c == g ? " " : "(cpu " + std::to_string(c) + ") ");
      if (c != g) {
        ++mismatches;
        double mx = 0;
        for (float v : lg) mx = std::max(mx, double(std::fabs(v)));
        // A near-tie: the GPU's token is within the tolerance of the CPU's best.
        EXPECT_LE(lg[static_cast<size_t>(c)] - lg[static_cast<size_t>(g)], 2 * tol * mx)
            << "step " << i;
      }
      in = g;
    }
    EXPECT_LE(mismatches, 2);
    std::printf("[GpuKQuantEngine %s] greedy tokens (same in all 4 configurations): %s\n",
                split == Split::AllOnGpu ? "all on gpu" : test::split_name(split), line.c_str());
  }
}

TEST(GpuKQuantEngine, LegacyStepMatchesFused) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = mixed();
  const auto fused = gpu_logits(m, gpu_opt(m, Split::AllOnGpu, MoeKernel::Fused, false));
  std::vector<std::vector<float>> legacy;
  {
    ScopedEnv env("KTUNE_GPU_LEGACY", "1");
    legacy = gpu_logits(m, gpu_opt(m, Split::AllOnGpu, MoeKernel::Fused, false));
  }
  // Both float32 throughout, in different summation orders: ~1e-6 relative per dot, amplified
  // through 4 layers; 1e-3 of max|logit| leaves room for that (a router flip would be far more).
  for (size_t s = 0; s < fused.size(); ++s) {
    const double rel = rel_diff(legacy[s], fused[s]);
    std::printf("[GpuKQuantEngine legacy] step %zu: max|legacy - fused| %.3g of max|logit|\n", s,
                rel);
    EXPECT_LE(rel, 1e-3) << "step " << s;
  }
}

std::vector<int32_t> prompt(int64_t n, uint32_t seed, int64_t vocab) {
  std::mt19937 gen(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(gen() % static_cast<uint32_t>(vocab));
  return t;
}

std::vector<float> gpu_prefill(const ModelWeights& m, const GpuEngineOptions& o,
                               const std::vector<int32_t>& toks) {
  GpuEngine e(m, o);
  std::vector<float> lg;
  e.prefill(toks.data(), static_cast<int64_t>(toks.size()), &lg);
  EXPECT_EQ(e.position(), static_cast<int64_t>(toks.size()));
  return lg;
}

// Relative RMS error of the head's dots with fp16-rounded activations and weights (the prefill
// matmul's operands; K-quant weights are dequantized, then rounded to fp16 once).
double fp16_noise(const ModelWeights& m) {
  const TensorView& w = m.output.data ? m.output : m.tok_embd;
  const int64_t n = w.row_len();
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(n)), row(x.size());
  auto r16 = [](float v) { return fp16_to_fp32(fp32_to_fp16(v)); };
  double se = 0, sr = 0;
  for (int trial = 0; trial < 4; ++trial) {
    for (auto& v : x) v = nd(gen);
    for (int64_t r = 0; r < std::min<int64_t>(w.n_rows(), 256); ++r) {
      dequantize_row(w.type, w.row(r), row.data(), n);
      double a = 0, b = 0;
      for (int64_t c = 0; c < n; ++c) {
        a += double(row[c]) * x[c];
        b += double(r16(row[c])) * r16(x[c]);
      }
      se += (a - b) * (a - b);
      sr += a * a;
    }
  }
  return std::sqrt(se / sr);
}

TEST(GpuKQuantPrefill, LogitsMatchCpuEngineAndDecodeSteps) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = mixed();
  const auto toks = prompt(37, 11, m.cfg.vocab);
  CpuEngine cpu(m, cpu_opt());
  std::vector<float> ref;
  cpu.prefill(toks.data(), static_cast<int64_t>(toks.size()), &ref, false);
  const GpuEngineOptions o = gpu_opt(m, Split::AllOnGpu, MoeKernel::Fused, false);
  const auto got = gpu_prefill(m, o, toks);  // chunks of 16, 16, 5
  ASSERT_EQ(got.size(), ref.size());
  double e1 = 0;
  const double tol = cpu_tolerance(m, &e1);
  const double rel = rel_diff(got, ref);
  std::printf(
      "[GpuKQuantPrefill] 37 tokens: max|gpu-cpu| %.4f%% of max|logit| (tolerance %.3f%%, "
      "e1 %.4f%%)\n",
      100 * rel, 100 * tol, 100 * e1);
  EXPECT_LE(rel, tol);

  // Against the engine's own decode steps (float32 activations): the fp16 rounding alone
  // (test_gpu_prefill.cpp's rule: 4 e_h sqrt(stages), floor 0.2%, one prompt up to 4x).
  const double eh = fp16_noise(m);
  const double tol16 = std::max(0.002, 4.0 * eh * std::sqrt(1.0 + 5.0 * m.cfg.n_layers));
  int outliers = 0;
  for (uint32_t seed : {1u, 2u, 3u}) {
    const auto p = prompt(29 + 6 * seed, seed, m.cfg.vocab);
    const auto a = gpu_prefill(m, o, p);
    GpuEngine e(m, o);
    std::vector<float> b;
    for (size_t i = 0; i < p.size(); ++i) e.decode(p[i], i + 1 == p.size() ? &b : nullptr);
    const double r = rel_diff(a, b);
    std::printf(
        "[GpuKQuantPrefill] prompt %zu: max|prefill - decode steps| %.4f%% (tolerance "
        "%.3f%%, fp16 noise %.4f%%)\n",
        p.size(), 100 * r, 100 * tol16, 100 * eh);
    if (r > tol16) {
      ++outliers;
      EXPECT_LE(r, 4 * tol16) << "prompt " << p.size();
    }
  }
  EXPECT_LE(outliers, 1);
}

TEST(GpuKQuantPrefill, StagedHybridEqualsAllGpuAndDecodeContinues) {
  KTUNE_REQUIRE_GPU();
  ScopedEnv min_staged("KTUNE_PREFILL_MIN_STAGED", "1");
  const ModelWeights& m = mixed();
  const auto toks = prompt(37, 3, m.cfg.vocab);
  const auto all_gpu = gpu_prefill(m, gpu_opt(m, Split::AllOnGpu, MoeKernel::Fused, false), toks);
  for (Split sp : {Split::EvenOnGpu, Split::AllOnCpu}) {
    const auto h = gpu_prefill(m, gpu_opt(m, sp, MoeKernel::Fused, false), toks);
    EXPECT_TRUE(same_bits(h, all_gpu)) << test::split_name(sp);
  }
  // Prefill, then greedy decoding with the graph on: the same tokens as decoding the prompt
  // step by step would give whenever the prefill's first token agrees (fp16 vs float32 paths).
  for (Split sp : {Split::AllOnGpu, Split::EvenOnGpu}) {
    GpuEngine a(m, gpu_opt(m, sp, MoeKernel::Fused, true));
    std::vector<float> la;
    a.prefill(toks.data(), static_cast<int64_t>(toks.size()), &la);
    const int32_t t0 = CpuEngine::argmax(la.data(), static_cast<int64_t>(la.size()));
    const auto ga = a.generate_greedy(t0, 16);
    EXPECT_EQ(a.position(), static_cast<int64_t>(toks.size()) + 16);
    GpuEngine b(m, gpu_opt(m, sp, MoeKernel::Fused, true));
    for (size_t i = 0; i < toks.size(); ++i) b.decode(toks[i], nullptr);
    const auto gb = b.generate_greedy(t0, 16);
    size_t same = 0;
    while (same < ga.size() && ga[same] == gb[same]) ++same;
    std::printf(
        "[GpuKQuantPrefill %s] greedy after prefill vs after decode steps: first %zu of "
        "16 equal\n",
        sp == Split::AllOnGpu ? "all on gpu" : test::split_name(sp), same);
    EXPECT_GE(same, 4u);  // the two KV caches differ by fp16 rounding only
  }
}

TEST(GpuKQuantEngine, DeviceBytesWithinPlan) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = mixed();
  Budgets budgets;
  budgets.bytes["cuda:0"] = 80 * kGiB;
  for (bool hybrid : {false, true}) {
    Placement p =
        make_uniform_placement(m.cfg, Device::cuda(0), hybrid ? Device::cpu() : Device::cuda(0));
    p.runtime.context = 64;
    p.runtime.cuda_graph = false;
    const MemoryPlan plan = plan_memory(m, p, budgets);
    const DeviceUse& g = plan.per_device.at("cuda:0");
    GpuEngineOptions o =
        gpu_opt(m, hybrid ? Split::AllOnCpu : Split::AllOnGpu, MoeKernel::Fused, false);
    o.max_prefill_chunk = 512;
    GpuEngine e(m, o);
    const int64_t planned = g.total - kGpuContextReserve;
    std::printf("[GpuKQuantEngine] %s: engine %lld bytes, plan %lld (weights %lld)\n",
                hybrid ? "experts on cpu" : "all on gpu", static_cast<long long>(e.device_bytes()),
                static_cast<long long>(planned), static_cast<long long>(g.weights));
    EXPECT_LE(e.device_bytes(), planned);
  }
}

TEST(GpuKQuantEngine, UnsupportedTypesRefused) {
  KTUNE_REQUIRE_GPU();
  SynthOptions o;
  o.preset = "tiny";
  o.quant = QuantType::F16;
  const ModelWeights f16 = make_synthetic_model(o);
  try {
    GpuEngine e(f16, GpuEngineOptions{64, false, MoeKernel::Fused});
    ADD_FAILURE() << "an F16 model was accepted";
  } catch (const Error& err) {
    const std::string what = err.what();
    std::printf("[GpuKQuantEngine] F16 model: %s\n", what.c_str());
    EXPECT_NE(what.find("output.weight"), std::string::npos) << what;
    EXPECT_NE(what.find("F16"), std::string::npos) << what;
  }
}

}  // namespace
}  // namespace ktune
