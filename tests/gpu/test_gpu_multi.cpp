// The multi-GPU layer split (ctest label `gpu`; each test skips with the reason on a machine
// with fewer than 2 GPUs):
//
//   GpuLink.*          the transports against a host copy: every planned pair (i -> i+1 and
//                      last -> 0) over all GPUs here, sizes from 4 bytes to 8 MiB, NCCL and
//                      peer (P2P where the GPUs allow it, and forced through pinned host
//                      memory); a source overwritten on its stream right after the copy and a
//                      destination read on its stream right after it see the ordering promised
//                      by gpu_link.h.
//   MultiGpuEngine.*   the engine split over 2 GPUs (and 3 and 4 where they exist): greedy tokens
//                      and every step's logits bit-identical to the one-GPU engine, graph on and
//                      off, NCCL and peer, all experts on the GPUs and with CPU experts in some
//                      layers; batched prefill (several chunks) and the unfused MoE equal too;
//                      one stage on cuda:1 equals cuda:0; bad splits are ktune::Errors.
// EngineRun the same binary with NCCL_P2P_DISABLE=1 to take the paths without peer access (NCCL
// through host memory, the peer transport staged through pinned buffers).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gpu/engine_test_util.h"
#include "gpu/gpu_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/gpu_link.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/gpu_stages.h"

namespace ktune {
namespace {

int gpu_count() { return static_cast<int>(test::gpus().devices.size()); }

#define KTUNE_REQUIRE_GPUS(n)                                                                  \
  do {                                                                                         \
    KTUNE_REQUIRE_GPU();                                                                       \
    if (gpu_count() < (n)) {                                                                   \
      GTEST_SKIP() << "needs " << (n) << " GPUs, this machine has " << gpu_count();            \
    }                                                                                          \
  } while (0)

// ---- transports ----------------------------------------------------------------------------

struct Rank {
  int device = 0;
  cuda::Stream stream;
  cuda::DeviceBuffer src, dst;
};

std::vector<std::unique_ptr<Rank>> make_ranks(int n, size_t bytes) {
  std::vector<std::unique_ptr<Rank>> r;
  for (int i = 0; i < n; ++i) {
    KTUNE_CUDA_CHECK(cudaSetDevice(i));
    auto k = std::make_unique<Rank>();
    k->device = i;
    k->stream = cuda::Stream();
    k->src = cuda::DeviceBuffer(bytes);
    k->dst = cuda::DeviceBuffer(bytes);
    r.push_back(std::move(k));
  }
  KTUNE_CUDA_CHECK(cudaSetDevice(0));
  return r;
}

// Copies rank i's src to rank (i+1)%n's dst for every i, `bytes` each, and checks every dst
// against the host's copy of the source; then overwrites each src on its own stream right
// after a second round of copies and checks that the copies still carried the first data.
void check_link(const char* what, int n,
                const std::function<std::unique_ptr<cuda::GpuLink>(
                    const std::vector<int>&, const std::vector<cudaStream_t>&,
                    const std::vector<std::pair<int, int>>&, size_t)>& make) {
  const size_t max_bytes = size_t{8} << 20;
  auto ranks = make_ranks(n, max_bytes);
  std::vector<int> devs;
  std::vector<cudaStream_t> streams;
  std::vector<std::pair<int, int>> pairs;
  for (int i = 0; i < n; ++i) {
    devs.push_back(i);
    streams.push_back(ranks[size_t(i)]->stream);
    pairs.emplace_back(i, (i + 1) % n);
  }
  auto link = make(devs, streams, pairs, max_bytes);
  std::mt19937 gen(7);
  for (size_t bytes : {size_t{4}, size_t{2048 * 4}, size_t{1} << 20, max_bytes}) {
    std::vector<std::vector<uint8_t>> host(static_cast<size_t>(n), std::vector<uint8_t>(bytes));
    for (int i = 0; i < n; ++i) {
      for (auto& b : host[size_t(i)]) b = static_cast<uint8_t>(gen());
      KTUNE_CUDA_CHECK(cudaSetDevice(i));
      KTUNE_CUDA_CHECK(cudaMemcpy(ranks[size_t(i)]->src.data(), host[size_t(i)].data(), bytes,
                                  cudaMemcpyHostToDevice));
      KTUNE_CUDA_CHECK(cudaMemset(ranks[size_t(i)]->dst.data(), 0, bytes));
      // cudaMemset of device memory may return before it is done, and the copy below runs on a
      // non-blocking stream: without this the zeroing could land after the copy.
      KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
    }
    for (int i = 0; i < n; ++i) {
      const int to = (i + 1) % n;
      link->copy(i, ranks[size_t(i)]->src.data(), to, ranks[size_t(to)]->dst.data(), bytes);
    }
    // The source overwritten on its own stream after the copy was enqueued: the copy must have
    // read it first (gpu_link.h: later work on from's stream may overwrite src).
    for (int i = 0; i < n; ++i) {
      KTUNE_CUDA_CHECK(cudaSetDevice(i));
      KTUNE_CUDA_CHECK(
          cudaMemsetAsync(ranks[size_t(i)]->src.data(), 0xab, bytes, ranks[size_t(i)]->stream));
    }
    std::vector<uint8_t> got(bytes);
    for (int i = 0; i < n; ++i) {
      const int to = (i + 1) % n;
      KTUNE_CUDA_CHECK(cudaSetDevice(to));
      // Read on to's stream: ordered after the copy.
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(got.data(), ranks[size_t(to)]->dst.data(), bytes,
                                       cudaMemcpyDeviceToHost, ranks[size_t(to)]->stream));
      KTUNE_CUDA_CHECK(cudaStreamSynchronize(ranks[size_t(to)]->stream));
      EXPECT_EQ(std::memcmp(got.data(), host[size_t(i)].data(), bytes), 0)
          << what << ": " << i << " -> " << to << ", " << bytes << " bytes";
    }
    for (int i = 0; i < n; ++i) {
      KTUNE_CUDA_CHECK(cudaSetDevice(i));
      KTUNE_CUDA_CHECK(cudaStreamSynchronize(ranks[size_t(i)]->stream));
    }
  }
  std::printf("[GpuLink] %s over %d GPUs: %s, every pair equal to the host copy\n", what, n,
              link->describe().c_str());
  link.reset();
  KTUNE_CUDA_CHECK(cudaSetDevice(0));
}

TEST(GpuLink, PeerCopiesEqualTheHostCopy) {
  KTUNE_REQUIRE_GPUS(2);
  check_link("peer", gpu_count(), [](auto& d, auto& s, auto& p, size_t b) {
    return cuda::make_peer_link(d, s, p, b);
  });
}

TEST(GpuLink, PeerStagedThroughHostEqualsTheHostCopy) {
  KTUNE_REQUIRE_GPUS(2);
  check_link("peer staged", gpu_count(), [](auto& d, auto& s, auto& p, size_t b) {
    auto l = cuda::make_peer_link(d, s, p, b, /*allow_p2p=*/false);
    EXPECT_EQ(l->describe(), "peer (staged through host)");
    return l;
  });
}

TEST(GpuLink, NcclSendRecvEqualsTheHostCopy) {
  KTUNE_REQUIRE_GPUS(2);
  if (!cuda::nccl_built()) GTEST_SKIP() << "this build has no NCCL";
  check_link("nccl", gpu_count(), [](auto& d, auto& s, auto&, size_t) {
    return cuda::make_nccl_link(d, s);
  });
}

TEST(GpuLink, UnplannedCopiesAreErrors) {
  KTUNE_REQUIRE_GPUS(2);
  auto ranks = make_ranks(2, 64);
  auto link = cuda::make_peer_link({0, 1}, {ranks[0]->stream, ranks[1]->stream}, {{0, 1}}, 64);
  EXPECT_THROW(link->copy(1, ranks[1]->src.data(), 0, ranks[0]->dst.data(), 4), Error);
  EXPECT_THROW(link->copy(0, ranks[0]->src.data(), 1, ranks[1]->dst.data(), 65), Error);
  EXPECT_THROW(cuda::make_peer_link({0}, {ranks[0]->stream}, {}, 64), Error);
}

// ---- the engine ------------------------------------------------------------------------------

using test::Split;
using test::split_name;
using test::tiny;

const std::vector<int32_t> kTokens = {1, 17, 300, 5, 999, 42, 7, 64};

// `ways` GPUs over the model's layers, as evenly as ktune run --gpus does.
std::vector<int> split_devices(const ModelConfig& c, int ways) {
  std::vector<int> d;
  for (const LayerPlacement& lp : make_gpu_split(c, ways, 0).layers) d.push_back(lp.attention.index);
  return d;
}

GpuEngineOptions opts(const ModelWeights& m, Split sp, bool graph, std::vector<int> devices,
                      GpuTransport t) {
  GpuEngineOptions o;
  o.max_context = 96;
  o.cuda_graph = graph;
  o.cpu_threads = 3;
  o.pin_threads = false;
  o.expert_on_gpu = test::expert_map(m.cfg, sp);
  o.layer_device = std::move(devices);
  o.gpu_transport = t;
  return o;
}

struct EngineRun {
  std::vector<std::vector<float>> logits;  // decode() of kTokens, then prefill's last logits
  std::vector<int32_t> greedy;
  std::vector<int32_t> after_prefill;      // greedy tokens after a 40-token batched prefill
  std::string describe;
};

EngineRun run(const ModelWeights& m, const GpuEngineOptions& o) {
  GpuEngine e(m, o);
  EngineRun r;
  for (int32_t t : kTokens) {
    r.logits.emplace_back();
    e.decode(t, &r.logits.back());
  }
  e.reset();
  r.greedy = e.generate_greedy(3, 24);
  e.reset();
  std::vector<int32_t> prompt(40);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 37 + 5) % 1000);
  r.logits.emplace_back();
  e.prefill(prompt.data(), static_cast<int64_t>(prompt.size()), &r.logits.back());
  r.after_prefill = e.generate_greedy(prompt.back(), 8);
  r.describe = e.describe();
  return r;
}

int same_steps(const EngineRun& a, const EngineRun& b) {
  int same = 0;
  for (size_t s = 0; s < a.logits.size() && s < b.logits.size(); ++s) {
    same += a.logits[s].size() == b.logits[s].size() &&
            std::memcmp(a.logits[s].data(), b.logits[s].data(), a.logits[s].size() * 4) == 0;
  }
  return same;
}

void expect_split_equals_one_gpu(int ways) {
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const std::vector<int> devs = split_devices(m.cfg, ways);
  for (Split sp : {Split::AllOnGpu, Split::EvenOnGpu, Split::FirstHalfLayersOnGpu}) {
    for (bool graph : {true, false}) {
      const EngineRun ref = run(m, opts(m, sp, graph, {}, GpuTransport::Auto));
      for (GpuTransport t : {GpuTransport::Nccl, GpuTransport::Peer, GpuTransport::Auto}) {
        if (t == GpuTransport::Nccl && !cuda::nccl_built()) continue;
        const EngineRun got = run(m, opts(m, sp, graph, devs, t));
        const int same = same_steps(ref, got);
        std::printf("[MultiGpuEngine %d-way] %s, graph %s, transport %s: %d/%zu steps bit-identical "
                    "to one GPU, greedy %s, after prefill %s\n  %s\n",
                    ways, split_name(sp), graph ? "on" : "off", gpu_transport_name(t), same,
                    ref.logits.size(), got.greedy == ref.greedy ? "equal" : "DIFFERENT",
                    got.after_prefill == ref.after_prefill ? "equal" : "DIFFERENT",
                    got.describe.c_str());
        EXPECT_EQ(same, static_cast<int>(ref.logits.size()));
        EXPECT_EQ(got.greedy, ref.greedy);
        EXPECT_EQ(got.after_prefill, ref.after_prefill);
        EXPECT_NE(got.describe.find("cuda:1"), std::string::npos) << got.describe;
        EXPECT_NE(got.describe.find("transport"), std::string::npos) << got.describe;
      }
    }
  }
}

TEST(MultiGpuEngine, TwoGpuSplitEqualsOneGpu) {
  KTUNE_REQUIRE_GPUS(2);
  expect_split_equals_one_gpu(2);
}

TEST(MultiGpuEngine, ThreeGpuSplitEqualsOneGpu) {
  KTUNE_REQUIRE_GPUS(3);
  expect_split_equals_one_gpu(3);
}

TEST(MultiGpuEngine, FourGpuSplitEqualsOneGpu) {
  KTUNE_REQUIRE_GPUS(4);
  expect_split_equals_one_gpu(4);
}

// Prefill in several chunks (8 tokens each, the last shorter): chunks move between the stages
// like the decode step's hidden state. With CPU experts, chunks below 16 tokens run as decode
// steps, so both prefill paths meet in one prompt.
TEST(MultiGpuEngine, ChunkedPrefillEqualsOneGpu) {
  KTUNE_REQUIRE_GPUS(2);
  const ModelWeights& m = tiny(QuantType::Q4_0);
  for (Split sp : {Split::AllOnGpu, Split::EvenOnGpu}) {
    for (int64_t chunk : {int64_t{8}, int64_t{32}}) {
      GpuEngineOptions one = opts(m, sp, true, {}, GpuTransport::Auto);
      one.max_prefill_chunk = chunk;
      GpuEngineOptions two = opts(m, sp, true, split_devices(m.cfg, 2), GpuTransport::Peer);
      two.max_prefill_chunk = chunk;
      const EngineRun a = run(m, one), b = run(m, two);
      EXPECT_EQ(same_steps(a, b), static_cast<int>(a.logits.size()))
          << split_name(sp) << ", chunk " << chunk;
      EXPECT_EQ(a.after_prefill, b.after_prefill) << split_name(sp) << ", chunk " << chunk;
    }
  }
}

// The unfused MoE (per-expert launches): host-driven without a graph (CPU experts computed on
// the calling thread, per-layer routing syncs on each stage's stream) and its graph form.
TEST(MultiGpuEngine, UnfusedSplitEqualsOneGpu) {
  KTUNE_REQUIRE_GPUS(2);
  const ModelWeights& m = tiny(QuantType::Q8_0);
  for (Split sp : {Split::AllOnGpu, Split::EvenOnGpu}) {
    for (bool graph : {false, true}) {
      GpuEngineOptions one = opts(m, sp, graph, {}, GpuTransport::Auto);
      one.moe_kernel = MoeKernel::Unfused;
      GpuEngineOptions two = opts(m, sp, graph, split_devices(m.cfg, 2), GpuTransport::Peer);
      two.moe_kernel = MoeKernel::Unfused;
      const EngineRun a = run(m, one), b = run(m, two);
      EXPECT_EQ(same_steps(a, b), static_cast<int>(a.logits.size()))
          << split_name(sp) << ", graph " << graph;
      EXPECT_EQ(a.greedy, b.greedy) << split_name(sp) << ", graph " << graph;
    }
  }
}

TEST(MultiGpuEngine, OneStageOnCuda1EqualsCuda0) {
  KTUNE_REQUIRE_GPUS(2);
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const std::vector<int> on1(static_cast<size_t>(m.cfg.n_layers), 1);
  for (Split sp : {Split::AllOnGpu, Split::EvenOnGpu}) {
    const EngineRun a = run(m, opts(m, sp, true, {}, GpuTransport::Auto));
    const EngineRun b = run(m, opts(m, sp, true, on1, GpuTransport::Auto));
    EXPECT_EQ(same_steps(a, b), static_cast<int>(a.logits.size())) << split_name(sp);
    EXPECT_EQ(a.greedy, b.greedy);
    EXPECT_EQ(b.describe.rfind("cuda:1 ", 0), 0u) << b.describe;
  }
}

TEST(MultiGpuEngine, BadSplitsAreErrorsNamingTheFix) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  std::vector<int> zigzag(static_cast<size_t>(m.cfg.n_layers), 0);
  zigzag[1] = 1;  // cuda:0, cuda:1, cuda:0, ...
  try {
    GpuEngine e(m, opts(m, Split::AllOnGpu, true, zigzag, GpuTransport::Auto));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("one contiguous range"), std::string::npos) << e.what();
  }
  EXPECT_THROW(GpuEngine(m, opts(m, Split::AllOnGpu, true, {0}, GpuTransport::Auto)), Error);
  std::vector<int> beyond(static_cast<size_t>(m.cfg.n_layers), 0);
  beyond.back() = 1000;
  try {
    GpuEngine e(m, opts(m, Split::AllOnGpu, true, beyond, GpuTransport::Auto));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda:1000: no such GPU here"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace ktune
