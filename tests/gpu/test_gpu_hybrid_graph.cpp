// CPU experts inside the CUDA graph, and the unfused MoE in a graph (ctest label `gpu`):
//
//   CudaSlotKernels.*  per-slot matvec / SwiGLU / axpy (expert read from device memory) against
//                      the plain launchers on the same expert: bit-identical; a CPU slot (-1) is
//                      a no-op.
//   CudaHandoff.*      the flag hand-off kernels with a host thread as the CPU side: the routing
//                      block arrives intact, the CPU sum is added exactly once; with no answer
//                      the wait gives up after its timeout, sets the error word, leaves x alone,
//                      and later waits return at once.
//   GpuEngineGraph.*   hybrid placements with the graph on, handed over by flags and by host
//                      nodes, fused and unfused: logits bit-identical to the host-driven step
//                      without a graph, greedy tokens identical graph / no graph and after
//                      reset; the all-GPU unfused graph equals fused; a stalled CPU side is a
//                      ktune::Error, not a hang.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "gpu/engine_test_util.h"
#include "gpu/gpu_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/hybrid_kernels.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/synthetic.h"

namespace ktune {
namespace {

template <class T>
T* upload(cuda::DeviceBuffer& buf, const std::vector<T>& h) {
  buf = cuda::DeviceBuffer(h.size() * sizeof(T));
  KTUNE_CUDA_CHECK(cudaMemcpy(buf.data(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return static_cast<T*>(buf.data());
}

template <class T>
std::vector<T> download(const T* p, size_t n) {
  std::vector<T> h(n);
  KTUNE_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

TEST(CudaSlotKernels, MatchPlainLaunchersAndSkipCpuSlots) {
  KTUNE_REQUIRE_GPU();
  const int64_t rows = 96, cols = 256, n_slots = 3;
  std::mt19937 gen(3);
  std::normal_distribution<float> nd;
  for (QuantType t : {QuantType::Q8_0, QuantType::Q4_0, QuantType::BF16}) {
    const int64_t mb = rows * row_bytes(t, cols);
    std::vector<uint8_t> w(static_cast<size_t>(mb * n_slots));
    for (int64_t s = 0; s < n_slots * rows; ++s) {
      std::vector<float> row(static_cast<size_t>(cols));
      for (float& v : row) v = nd(gen);
      quantize_row(t, row.data(), w.data() + s * row_bytes(t, cols), cols);
    }
    std::vector<float> x(static_cast<size_t>(cols));
    for (float& v : x) v = nd(gen);
    const std::vector<int32_t> ids = {2, 1, 0};           // expert ids of slots j = 0, 1, 2
    const std::vector<int32_t> slot_map = {1, -1, 2, 0};  // expert 1 is a CPU expert
    const std::vector<float> wts = {0.5f, 0.25f, 0.125f};
    cuda::DeviceBuffer bw, bx, bi, bm, bwt, by, bref, bg, bu, ba, bacc, bacc2;
    const uint8_t* dw = upload(bw, w);
    const float* dx = upload(bx, x);
    const int32_t* di = upload(bi, ids);
    const int32_t* dm = upload(bm, slot_map);
    const float* dwt = upload(bwt, wts);
    const std::vector<float> sentinel(static_cast<size_t>(rows), 7.0f);
    for (int64_t j = 0; j < 3; ++j) {
      float* dy = upload(by, sentinel);
      float* dref = upload(bref, sentinel);
      ASSERT_EQ(cuda::launch_matvec_rowwarp_slot(t, dw, mb, di, j, dm, dx, rows, cols, dy, 0),
                cudaSuccess);
      const int32_t slot = slot_map[static_cast<size_t>(ids[static_cast<size_t>(j)])];
      if (slot >= 0) {
        ASSERT_EQ(cuda::launch_matvec_rowwarp(t, dw + slot * mb, dx, rows, cols, dref, 0),
                  cudaSuccess);
      }
      const auto got = download(dy, static_cast<size_t>(rows));
      const auto ref = download(dref, static_cast<size_t>(rows));
      EXPECT_EQ(std::memcmp(got.data(), ref.data(), got.size() * 4), 0)
          << quant_name(t) << " slot " << j;
      // The same slot with no map: slot = id (expert ids index the matrices directly).
      if (j != 0) continue;
      dy = upload(by, sentinel);
      ASSERT_EQ(cuda::launch_matvec_rowwarp_slot(t, dw, mb, di, 1, nullptr, dx, rows, cols, dy, 0),
                cudaSuccess);
      dref = upload(bref, sentinel);
      ASSERT_EQ(cuda::launch_matvec_rowwarp(t, dw + 1 * mb, dx, rows, cols, dref, 0), cudaSuccess);
      EXPECT_EQ(download(dy, static_cast<size_t>(rows)), download(dref, static_cast<size_t>(rows)));
    }
    // SwiGLU and the weighted add: slot 1 (a CPU expert) changes nothing.
    std::vector<float> g(static_cast<size_t>(rows)), u(g), acc0(g);
    for (size_t i = 0; i < g.size(); ++i) {
      g[i] = nd(gen);
      u[i] = nd(gen);
      acc0[i] = nd(gen);
    }
    const float* dg = upload(bg, g);
    const float* du = upload(bu, u);
    float* da = upload(ba, sentinel);
    float* dacc = upload(bacc, acc0);
    float* dacc2 = upload(bacc2, acc0);
    ASSERT_EQ(cuda::launch_swiglu_slot(di, 1, dm, dg, du, rows, da, 0), cudaSuccess);
    EXPECT_EQ(download(da, static_cast<size_t>(rows)), sentinel);
    ASSERT_EQ(cuda::launch_swiglu_slot(di, 0, dm, dg, du, rows, da, 0), cudaSuccess);
    float* dref = upload(bref, sentinel);
    ASSERT_EQ(cuda::launch_swiglu(dg, du, rows, dref, 0), cudaSuccess);
    EXPECT_EQ(download(da, static_cast<size_t>(rows)), download(dref, static_cast<size_t>(rows)));
    ASSERT_EQ(cuda::launch_axpy_slot(di, 1, dm, dwt, dg, rows, dacc, 0), cudaSuccess);
    EXPECT_EQ(download(dacc, static_cast<size_t>(rows)), acc0);
    ASSERT_EQ(cuda::launch_axpy_slot(di, 2, dm, dwt, dg, rows, dacc, 0), cudaSuccess);
    ASSERT_EQ(cuda::launch_axpy_accumulate(wts[2], dg, rows, dacc2, 0), cudaSuccess);
    EXPECT_EQ(download(dacc, static_cast<size_t>(rows)),
              download(dacc2, static_cast<size_t>(rows)));
    EXPECT_EQ(
        cuda::launch_matvec_rowwarp_slot(t, dw, mb, di, -1, dm, dx, rows, cols, by.as<float>(), 0),
        cudaErrorInvalidValue);
  }
}

// A mapped pinned block laid out like the engine's: error word, words, stage, y.
struct Mapped {
  uint8_t* host = nullptr;
  uint8_t* dev = nullptr;
  explicit Mapped(size_t bytes) {
    KTUNE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host), bytes, cudaHostAllocMapped));
    std::memset(host, 0, bytes);
    KTUNE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev), host, 0));
  }
  ~Mapped() { cudaFreeHost(host); }
};

TEST(CudaHandoff, SignalWaitRoundTripAddsTheCpuSumOnce) {
  KTUNE_REQUIRE_GPU();
  const int n = 2048, stage_words = n + 16;
  Mapped m(64 + 64 + stage_words * 4 + n * 4);
  auto* herr = reinterpret_cast<uint32_t*>(m.host);
  auto* derr = reinterpret_cast<uint32_t*>(m.dev);
  auto* hw = reinterpret_cast<cuda::HandoffWords*>(m.host + 64);
  auto* dw = reinterpret_cast<cuda::HandoffWords*>(m.dev + 64);
  auto* hstage = reinterpret_cast<uint32_t*>(m.host + 128);
  auto* dstage = m.dev + 128;
  auto* hy = reinterpret_cast<float*>(m.host + 128 + stage_words * 4);
  auto* dy = reinterpret_cast<float*>(m.dev + 128 + stage_words * 4);
  std::vector<uint32_t> stage(stage_words);
  for (int i = 0; i < stage_words; ++i) stage[i] = 0x9e3779b9u * static_cast<uint32_t>(i + 1);
  std::vector<float> x0(n);
  std::mt19937 gen(5);
  std::normal_distribution<float> nd;
  for (float& v : x0) v = nd(gen);
  cuda::DeviceBuffer bs, bx, bp, be;
  const uint32_t* ds = upload(bs, stage);
  float* dx = upload(bx, x0);
  const int32_t* dpos = upload(bp, std::vector<int32_t>{41});
  const uint32_t* dep = upload(be, std::vector<uint32_t>{3});
  const uint64_t seq = (uint64_t{3} << 32) | 41u;
  std::vector<float> y(n);
  for (float& v : y) v = nd(gen);
  for (uint32_t n_cpu : {2u, 0u}) {
    std::atomic<bool> stage_ok{false};
    hw->done = 0;
    hw->request = 0;
    std::thread cpu([&] {
      while (__atomic_load_n(&hw->request, __ATOMIC_ACQUIRE) != seq) std::this_thread::yield();
      stage_ok = std::memcmp(hstage, stage.data(), stage.size() * 4) == 0;
      std::memcpy(hy, y.data(), y.size() * 4);
      hw->n_cpu = n_cpu;
      __atomic_store_n(&hw->done, seq, __ATOMIC_RELEASE);
    });
    KTUNE_CUDA_CHECK(cudaMemcpy(dx, x0.data(), n * 4, cudaMemcpyHostToDevice));
    ASSERT_EQ(cuda::launch_handoff_signal(ds, stage.size() * 4, dstage, dpos, dep, dw, 0),
              cudaSuccess);
    ASSERT_EQ(cuda::launch_handoff_wait_add(dw, dy, dpos, dep, derr, 5, 5'000'000'000ull, dx, n, 0),
              cudaSuccess);
    KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
    cpu.join();
    EXPECT_TRUE(stage_ok);
    EXPECT_EQ(*herr, 0u);
    const auto got = download(dx, static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      const float want = n_cpu > 0 ? x0[i] + y[i] : x0[i];
      ASSERT_EQ(got[i], want) << "i " << i << " n_cpu " << n_cpu;
    }
  }
}

TEST(CudaHandoff, TimeoutSetsTheErrorWordAndLeavesXAlone) {
  KTUNE_REQUIRE_GPU();
  const int n = 256;
  Mapped m(64 + 64 + n * 4);
  auto* herr = reinterpret_cast<uint32_t*>(m.host);
  auto* derr = reinterpret_cast<uint32_t*>(m.dev);
  auto* dw = reinterpret_cast<cuda::HandoffWords*>(m.dev + 64);
  auto* dy = reinterpret_cast<float*>(m.dev + 128);
  std::vector<float> x0(n, 1.5f);
  cuda::DeviceBuffer bx, bp, be;
  float* dx = upload(bx, x0);
  const int32_t* dpos = upload(bp, std::vector<int32_t>{7});
  const uint32_t* dep = upload(be, std::vector<uint32_t>{1});
  // Nobody answers: the first wait gives up after 20 ms and records its code; the second finds
  // the error word set and returns without waiting (its code does not overwrite the first).
  ASSERT_EQ(cuda::launch_handoff_wait_add(dw, dy, dpos, dep, derr, 11, 20'000'000ull, dx, n, 0),
            cudaSuccess);
  ASSERT_EQ(cuda::launch_handoff_wait_add(dw, dy, dpos, dep, derr, 12, 60'000'000'000ull, dx, n, 0),
            cudaSuccess);
  KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(*herr, 11u);
  EXPECT_EQ(download(dx, static_cast<size_t>(n)), x0);
  EXPECT_EQ(cuda::launch_handoff_wait_add(dw, dy, dpos, dep, derr, 0, 1, dx, n, 0),
            cudaErrorInvalidValue);  // error code 0 means "fine": refused
}

// ---- the engine ----

const std::vector<int32_t> kTokens = {1, 17, 300, 5, 999, 42, 7, 64};

using test::tiny;

std::vector<std::vector<float>> logits_of(const ModelWeights& m, const GpuEngineOptions& o) {
  GpuEngine e(m, o);
  std::vector<std::vector<float>> out;
  for (int32_t t : kTokens) {
    out.emplace_back();
    e.decode(t, &out.back());
  }
  return out;
}

using test::Split;
using test::split_name;

GpuEngineOptions opts(const ModelWeights& m, Split sp, bool graph, MoeKernel k, CpuHandoff h) {
  GpuEngineOptions o;
  o.max_context = 64;
  o.cuda_graph = graph;
  o.moe_kernel = k;
  o.cpu_handoff = h;
  o.cpu_threads = 3;
  o.pin_threads = false;
  o.expert_on_gpu = test::expert_map(m.cfg, sp);
  return o;
}

TEST(GpuEngineGraph, HybridGraphBitIdenticalToHostDrivenStep) {
  KTUNE_REQUIRE_GPU();
  for (QuantType qt : {QuantType::Q8_0, QuantType::Q4_0}) {
    const ModelWeights& m = tiny(qt);
    for (Split sp : {Split::EvenOnGpu, Split::AllOnCpu, Split::FirstHalfLayersOnGpu}) {
      // The reference: unfused without a graph, CPU experts computed on the calling thread.
      const auto ref = logits_of(m, opts(m, sp, false, MoeKernel::Unfused, CpuHandoff::Flags));
      for (bool graph : {false, true}) {
        for (MoeKernel k : {MoeKernel::Fused, MoeKernel::Unfused}) {
          if (!graph && k == MoeKernel::Unfused) continue;  // that is the reference
          for (CpuHandoff h : {CpuHandoff::Flags, CpuHandoff::HostNode}) {
            const auto got = logits_of(m, opts(m, sp, graph, k, h));
            int same = 0;
            for (size_t s = 0; s < ref.size(); ++s) {
              same += std::memcmp(ref[s].data(), got[s].data(), ref[s].size() * 4) == 0;
            }
            std::printf(
                "[GpuEngineGraph %s] %s, graph %s, moe %s, handoff %s: %d/%zu steps "
                "bit-identical to the host-driven step\n",
                quant_name(qt), split_name(sp), graph ? "on" : "off", moe_kernel_name(k),
                cpu_handoff_name(h), same, ref.size());
            EXPECT_EQ(same, static_cast<int>(ref.size()));
          }
        }
      }
    }
  }
}

TEST(GpuEngineGraph, GreedyTokensSameWithAndWithoutGraphAndAfterReset) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  for (CpuHandoff h : {CpuHandoff::Flags, CpuHandoff::HostNode}) {
    GpuEngine g(m, opts(m, Split::EvenOnGpu, true, MoeKernel::Fused, h));
    GpuEngine e(m, opts(m, Split::EvenOnGpu, false, MoeKernel::Fused, h));
    const auto tg = g.generate_greedy(3, 40);
    const auto te = e.generate_greedy(3, 40);
    ASSERT_EQ(tg.size(), 40u);
    EXPECT_EQ(tg, te);
    g.reset();
    EXPECT_EQ(g.generate_greedy(3, 40), tg);
    // decode() steps one at a time through the same replayed graph.
    g.reset();
    int32_t tok = 3;
    for (size_t i = 0; i < 10; ++i) {
      std::vector<float> lg;
      g.decode(tok, &lg);
      tok = static_cast<int32_t>(std::max_element(lg.begin(), lg.end()) - lg.begin());
      EXPECT_EQ(tok, tg[i]) << "step " << i;
    }
    std::printf("[GpuEngineGraph] %s: 40 greedy tokens identical graph / no graph / after reset\n",
                g.describe().c_str());
  }
}

TEST(GpuEngineGraph, AllGpuUnfusedGraphEqualsFused) {
  KTUNE_REQUIRE_GPU();
  for (QuantType qt : {QuantType::Q8_0, QuantType::Q4_0}) {
    const ModelWeights& m = tiny(qt);
    GpuEngineOptions f{64, true, MoeKernel::Fused};
    GpuEngineOptions u{64, true, MoeKernel::Unfused};
    const auto a = logits_of(m, f);
    const auto b = logits_of(m, u);
    for (size_t s = 0; s < a.size(); ++s) {
      EXPECT_EQ(std::memcmp(a[s].data(), b[s].data(), a[s].size() * 4), 0) << "step " << s;
    }
  }
}

TEST(GpuEngineGraph, StalledCpuSideIsAnErrorNotAHang) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  setenv("KTUNE_TEST_HANDOFF_STALL_MS", "200", 1);
  for (CpuHandoff h : {CpuHandoff::Flags, CpuHandoff::HostNode}) {
    for (bool graph : {true, false}) {
      GpuEngineOptions o = opts(m, Split::AllOnCpu, graph, MoeKernel::Fused, h);
      o.handoff_timeout_ms = 30;
      GpuEngine e(m, o);
      try {
        std::vector<float> lg;
        e.decode(1, &lg);
        ADD_FAILURE() << "expected ktune::Error (" << cpu_handoff_name(h) << ")";
      } catch (const Error& err) {
        const std::string w = err.what();
        std::printf("[GpuEngineGraph] stalled CPU side, handoff %s, graph %s: %s\n",
                    cpu_handoff_name(h), graph ? "on" : "off", w.c_str());
        EXPECT_NE(w.find("cpu experts"), std::string::npos) << w;
      }
    }
  }
  unsetenv("KTUNE_TEST_HANDOFF_STALL_MS");
}


// PCIe assist (runtime.pcie_assist): the GPU computes a share of each token's CPU experts from
// host memory over PCIe, the CPU the rest. Same logits as without it within the GPU-vs-CPU
// activation noise, bit-identical graph on and off, and greedy tokens equal to the unassisted
// engine's.
TEST(GpuEngineGraph, PcieAssistMatchesTheUnassistedStep) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  for (Split sp : {Split::AllOnCpu, Split::EvenOnGpu}) {
    const auto ref = logits_of(m, opts(m, sp, false, MoeKernel::Fused, CpuHandoff::Flags));
    for (int permille : {500, 950}) {
      std::vector<std::vector<float>> by_graph[2];
      for (bool graph : {false, true}) {
        GpuEngineOptions o = opts(m, sp, graph, MoeKernel::Fused, CpuHandoff::Flags);
        o.pcie_assist_permille = permille;
        {
          GpuEngine e(m, o);
          EXPECT_NE(e.describe().find("pcie assist: the GPU computes"), std::string::npos)
              << e.describe();
        }
        by_graph[graph] = logits_of(m, o);
      }
      double worst = 0;
      for (size_t s = 0; s < ref.size(); ++s) {
        float mx = 0;
        for (float v : ref[s]) mx = std::max(mx, std::fabs(v));
        for (size_t i = 0; i < ref[s].size(); ++i) {
          worst = std::max(worst, std::fabs(by_graph[0][s][i] - ref[s][i]) / double(mx));
        }
        EXPECT_EQ(std::memcmp(by_graph[0][s].data(), by_graph[1][s].data(), ref[s].size() * 4), 0)
            << "step " << s << ": graph on and off differ";
      }
      std::printf("[GpuEngineGraph pcie assist %d/1000] %s: max |assisted - unassisted| %.3g of "
                  "max|logit|; graph on == off\n",
                  permille, split_name(sp), worst);
      // The assisted experts run on the GPU with float32 activations where CpuMoe quantizes h
      // to Q8_0: the GPU-vs-CPU engine tests allow at least 1 % of max|logit| for that noise
      // (test_gpu_engine.cpp); 0.98 % was seen here on the H100, so 2 %.
      EXPECT_LT(worst, 0.02);
      EXPECT_GT(worst, 0.0);  // the assisted experts did move to the GPU's arithmetic
    }
  }
  // Greedy tokens, all experts on the CPU, assisted (half of the CPU experts) vs not: the first 8
  // agree (the steps the logits above cover); later ones may part at a near-tie of this random
  // model, as the GPU-vs-CPU engine tests allow (18 of 24 agreed on the H100). The assisted run
  // repeats itself exactly.
  GpuEngineOptions o = opts(m, Split::AllOnCpu, true, MoeKernel::Fused, CpuHandoff::Flags);
  GpuEngine plain(m, o);
  const auto want = plain.generate_greedy(3, 24);
  o.pcie_assist_permille = 500;
  GpuEngine assisted(m, o);
  const auto got = assisted.generate_greedy(3, 24);
  EXPECT_TRUE(std::equal(want.begin(), want.begin() + 8, got.begin()));
  assisted.reset();
  EXPECT_EQ(assisted.generate_greedy(3, 24), got);
  size_t same = 0;
  while (same < got.size() && got[same] == want[same]) ++same;
  std::printf("[GpuEngineGraph pcie assist] greedy: %zu of 24 tokens as without the assist\n", same);
  // KTUNE_PCIE_ASSIST=off is a kill switch over the option.
  setenv("KTUNE_PCIE_ASSIST", "off", 1);
  GpuEngine killed(m, o);
  unsetenv("KTUNE_PCIE_ASSIST");
  EXPECT_EQ(killed.describe().find("pcie assist"), std::string::npos) << killed.describe();
}

// The assist needs the fused kernel: with the unfused one it is off and says why.
TEST(GpuEngineGraph, PcieAssistIsOffForTheUnfusedKernel) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  GpuEngineOptions o = opts(m, Split::AllOnCpu, true, MoeKernel::Unfused, CpuHandoff::Flags);
  o.pcie_assist_permille = 500;
  GpuEngine e(m, o);
  EXPECT_NE(e.describe().find("pcie assist off"), std::string::npos) << e.describe();
}

}  // namespace
}  // namespace ktune
