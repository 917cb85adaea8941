// Decode speed of the all-on-GPU engine (a DISABLED_ test: run it with
// --gtest_also_run_disabled_tests --gtest_filter='GpuEngineBench*'). Model: synth:qwen3-30b-a3b
// with Q4_0 matrices (KTUNE_BENCH_MODEL=PRESET[:QUANT] overrides, e.g. tiny:q8_0), built in
// memory. For fused + graph, fused without graph and unfused without graph: 16 warm-up tokens,
// then generate_greedy of 128 tokens (one host read at the end), 3 repetitions, mean ± stddev.
// The memory-bound limit: ModelWeights::bytes_per_token_decode() / the device-to-device copy
// bandwidth measured here (1 GiB cudaMemcpy, read + write counted).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gpu/gpu_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/gpu_info.h"
#include "ktune/engine/synthetic.h"

namespace ktune {
namespace {

double copy_bandwidth() {
  const size_t bytes = size_t{1} << 30;
  cuda::DeviceBuffer a(bytes), b(bytes);
  KTUNE_CUDA_CHECK(cudaMemset(a.data(), 1, bytes));
  KTUNE_CUDA_CHECK(cudaMemcpy(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice));
  KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
  const int reps = 10;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) {
    KTUNE_CUDA_CHECK(cudaMemcpy(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice));
  }
  KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * static_cast<double>(bytes) * reps / s;
}

// Per-kernel time of layer 0's fused MoE kernels and its Wq matvec at the model's shapes: 64
// launches, each with a different set of k experts (so expert weights are mostly not L2-hot),
// timed with events; prints µs per launch and GB/s of weight bytes read.
void kernel_breakdown(const ModelWeights& m) {
  const LayerWeights& L = m.layers[0];
  const ModelConfig& c = m.cfg;
  const int64_t k = c.n_experts_used, reps = 64;
  cuda::DeviceBuffer g(L.gate_exps.nbytes()), u(L.up_exps.nbytes()), d(L.down_exps.nbytes()),
      wq(L.wq.nbytes());
  KTUNE_CUDA_CHECK(
      cudaMemcpy(g.data(), L.gate_exps.data, L.gate_exps.nbytes(), cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(
      cudaMemcpy(u.data(), L.up_exps.data, L.up_exps.nbytes(), cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(
      cudaMemcpy(d.data(), L.down_exps.data, L.down_exps.nbytes(), cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(cudaMemcpy(wq.data(), L.wq.data, L.wq.nbytes(), cudaMemcpyHostToDevice));
  std::vector<int32_t> ids(static_cast<size_t>(reps * k));
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t j = 0; j < k; ++j)
      ids[r * k + j] = static_cast<int32_t>((r * 37 + j * 13) % c.n_experts);
  std::vector<float> wts(static_cast<size_t>(k), 1.0f / k),
      xs(static_cast<size_t>(c.hidden), 0.01f);
  cuda::DeviceBuffer dids(ids.size() * 4), dw(wts.size() * 4), dx(xs.size() * 4 + 16),
      act(static_cast<size_t>(k * c.expert_ffn) * 4),
      y(static_cast<size_t>(c.n_heads * c.head_dim) * 4);
  KTUNE_CUDA_CHECK(cudaMemcpy(dids.data(), ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(cudaMemcpy(dw.data(), wts.data(), wts.size() * 4, cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(cudaMemcpy(dx.data(), xs.data(), xs.size() * 4, cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(cudaMemset(act.data(), 0, act.size()));
  cuda::Stream st;
  cuda::Event e0, e1;
  const QuantType t = L.gate_exps.type;
  const int64_t gbytes = c.expert_ffn * L.gate_exps.row_stride();
  const int64_t dbytes = c.hidden * L.down_exps.row_stride();
  auto time = [&](const char* name, double bytes, auto&& launch) {
    launch(0);
    KTUNE_CUDA_CHECK(cudaStreamSynchronize(st));
    e0.record(st);
    for (int64_t r = 0; r < reps; ++r) KTUNE_CUDA_CHECK(launch(r));
    e1.record(st);
    e1.synchronize();
    const double us = 1000.0 * e1.elapsed_ms_since(e0) / reps;
    std::printf("# kernel %-28s %8.1f us %8.0f GB/s\n", name, us, bytes / (us * 1e3));
  };
  time("moe_gate_up_swiglu (k experts)", 2.0 * k * gbytes, [&](int64_t r) {
    return cuda::launch_moe_gate_up_swiglu(
        t, g.data(), u.data(), gbytes, dids.as<int32_t>() + r * k, k, c.n_experts, dx.as<float>(),
        c.expert_ffn, c.hidden, act.as<float>(), st);
  });
  time("moe_down_sum (k experts)", 1.0 * k * dbytes, [&](int64_t r) {
    return cuda::launch_moe_down_sum(L.down_exps.type, d.data(), dbytes, dids.as<int32_t>() + r * k,
                                     dw.as<float>(), k, c.n_experts, act.as<float>(), c.hidden,
                                     c.expert_ffn, dx.as<float>(), st);
  });
  time("matvec wq (L2-hot)", double(L.wq.nbytes()), [&](int64_t) {
    return cuda::launch_matvec(L.wq.type, wq.data(), dx.as<float>(), L.wq.n_rows(), c.hidden,
                               y.as<float>(), st);
  });
  time("matvec_rowwarp wq (L2-hot)", double(L.wq.nbytes()), [&](int64_t) {
    return cuda::launch_matvec_rowwarp(L.wq.type, wq.data(), dx.as<float>(), L.wq.n_rows(),
                                       c.hidden, y.as<float>(), st);
  });
  // launch_matvec_fused on Wq: L2-hot, then cold (16 copies, 75 MB > L2, rotated), by rows per
  // warp (0 = the launcher's choice), and the output head's shape cold.
  const int64_t nc = 16, wqb = L.wq.nbytes();
  cuda::DeviceBuffer cold(static_cast<size_t>(nc * wqb));
  for (int64_t i = 0; i < nc; ++i) {
    KTUNE_CUDA_CHECK(cudaMemcpy(cold.as<uint8_t>() + i * wqb, wq.data(), static_cast<size_t>(wqb),
                                cudaMemcpyDeviceToDevice));
  }
  for (int rpw : {0, 1, 2, 4}) {
    for (bool hot : {true, false}) {
      char name[64];
      std::snprintf(name, sizeof name, "matvec_fused wq R%d (%s)", rpw, hot ? "L2-hot" : "cold");
      time(name, double(wqb), [&](int64_t r) {
        cuda::MatvecFused a;
        a.type = L.wq.type;
        a.cols = c.hidden;
        a.x = dx.as<float>();
        a.seg[0] = {hot ? wq.data() : static_cast<const void*>(cold.as<uint8_t>() + (r % nc) * wqb),
                    y.as<float>(), L.wq.n_rows()};
        a.rows_per_warp = rpw;
        return cuda::launch_matvec_fused(a, st);
      });
    }
  }
  // wo's shape (hidden rows of n_heads * head_dim): the first 2048-row slices of the cold copies
  // read as [hidden][4096] (same bytes per row pair), cold.
  for (int rpw : {0, 1, 2}) {
    char name[64];
    std::snprintf(name, sizeof name, "matvec_fused wo-shape R%d (cold)", rpw);
    const int64_t rows = L.wq.n_rows() / 2;
    cuda::DeviceBuffer xo(static_cast<size_t>(2 * c.hidden) * 4 + 16);
    KTUNE_CUDA_CHECK(cudaMemset(xo.data(), 0, static_cast<size_t>(2 * c.hidden) * 4));
    time(name, double(wqb), [&](int64_t r) {
      cuda::MatvecFused a;
      a.type = L.wq.type;
      a.cols = 2 * c.hidden;
      a.x = xo.as<float>();
      a.seg[0] = {cold.as<uint8_t>() + (r % nc) * wqb, y.as<float>(), rows};
      a.rows_per_warp = rpw;
      return cuda::launch_matvec_fused(a, st);
    });
  }
}

TEST(GpuEngineBench, DISABLED_DecodeTokPerSec) {
  KTUNE_REQUIRE_GPU();
  std::string spec = "qwen3-30b-a3b:q4_0";
  if (const char* e = std::getenv("KTUNE_BENCH_MODEL")) spec = e;
  const SynthOptions so = parse_synth_spec("synth:" + spec);
  const auto tl = std::chrono::steady_clock::now();
  const ModelWeights m = make_synthetic_model(so);
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - tl).count();
  const double bw = copy_bandwidth();
  const double bpt = static_cast<double>(m.bytes_per_token_decode());
  const double limit = bw / bpt;
  std::printf("# device: %s (%.1f GiB), driver %d, commit %s\n",
              ::ktune::test::gpus().devices[0].name.c_str(),
              ::ktune::test::gpus().devices[0].total_bytes / 1073741824.0,
              ::ktune::test::gpus().driver_version,
              std::getenv("KTUNE_COMMIT") ? std::getenv("KTUNE_COMMIT") : "?");
  std::printf("# model: synth:%s (built in %.1f s), weights %.2f GiB, bytes/token %.1f MB\n",
              spec.c_str(), load_s, m.weight_bytes() / 1073741824.0, bpt / 1e6);
  std::printf("# device-to-device copy bandwidth %.0f GB/s -> memory-bound limit %.0f tok/s\n",
              bw / 1e9, limit);
  kernel_breakdown(m);
  std::printf("%-24s %12s %10s %14s\n", "config", "tok/s", "stddev", "of limit (%)");
  struct Cfg {
    const char* name;
    bool graph;
    MoeKernel moe;
  };
  const int n = 128, reps = 3;
  // "(legacy)": the one-launch-per-op step (KTUNE_GPU_LEGACY=1), for A/B on the same machine.
  for (const Cfg& c : {Cfg{"fused + graph", true, MoeKernel::Fused},
                       Cfg{"fused + graph (legacy)", true, MoeKernel::Fused},
                       Cfg{"fused, no graph", false, MoeKernel::Fused},
                       Cfg{"fused, no graph (legacy)", false, MoeKernel::Fused},
                       Cfg{"unfused, no graph", false, MoeKernel::Unfused}}) {
    const bool legacy = std::string(c.name).find("legacy") != std::string::npos;
    if (legacy) setenv("KTUNE_GPU_LEGACY", "1", 1);
    GpuEngineOptions opt;
    opt.max_context = 256;
    opt.cuda_graph = c.graph;
    opt.moe_kernel = c.moe;
    GpuEngine e(m, opt);
    if (legacy) unsetenv("KTUNE_GPU_LEGACY");
    e.generate_greedy(1, 16);  // warm-up (and graph capture)
    std::vector<double> tps;
    std::vector<int32_t> first;
    for (int r = 0; r < reps; ++r) {
      e.reset();
      const auto t0 = std::chrono::steady_clock::now();
      const std::vector<int32_t> toks = e.generate_greedy(1, n);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      tps.push_back(n / s);
      if (r == 0) first = toks;
      EXPECT_EQ(toks, first);
    }
    double mean = 0, var = 0;
    for (double t : tps) mean += t / reps;
    for (double t : tps) var += (t - mean) * (t - mean) / std::max(1, reps - 1);
    std::printf("%-24s %12.1f %10.1f %14.1f\n", c.name, mean, std::sqrt(var), 100 * mean / limit);
    std::fflush(stdout);
  }
}

}  // namespace
}  // namespace ktune
