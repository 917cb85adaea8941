// Several GPUs on a real machine: `ktune profile --hardware`'s link probe measures every directed
// pair (peer copies; NCCL send/recv when libnccl loads) and the result passes the profile's
// validating reader; CUPTI's peer-copy records reach the timeline as transfers with the peer's
// device. Skipped (with the reason) without a GPU or with one GPU.
#include <gtest/gtest.h>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "gpu_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "profiler/analysis.h"
#include "profiler/cupti_activity.h"
#include "profiler/hardware.h"

namespace ktune {
namespace {

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

TEST(ProfilerInterconnect, OneGpuMeasuresNoLinks) {
  KTUNE_REQUIRE_GPU();
  profiler::HardwareOptions o;
  o.quick = true;
  profile::ProfileSummary s;
  profiler::measure_gpus(o, s, nullptr);
  s.gpus.resize(1);
  s.gpu_costs.resize(1);
  nlohmann::json raw = nlohmann::json::object();
  profiler::measure_interconnect(o, s, &raw);
  EXPECT_TRUE(s.interconnect.empty());
  EXPECT_FALSE(raw.contains("interconnect"));
}

TEST(ProfilerInterconnect, EveryDirectedPairIsMeasured) {
  KTUNE_REQUIRE_GPU();
  if (gpu_count() < 2) GTEST_SKIP() << "one GPU: no pair to measure";
  profiler::HardwareOptions o;
  o.quick = true;
  profile::ProfileSummary s;
  profiler::stamp_summary(s, "hardware");
  s.cpu = profiler::measure_cpu(o, nullptr);
  s.cpu_costs.moe_decode_gb_s = {{1, 1.0}};
  profiler::measure_gpus(o, s, nullptr);
  nlohmann::json raw = nlohmann::json::object();
  profiler::measure_interconnect(o, s, &raw);
  const size_t n = s.gpus.size();
  ASSERT_EQ(s.interconnect.size(), n * (n - 1));
  const bool nccl = raw.value("interconnect_nccl", std::string()) == "libnccl loaded";
  for (const profile::GpuLink& l : s.interconnect) {
    std::printf("%s -> %s: peer access %d, peer copy %.1f GB/s, %.2f us; NCCL %.1f GB/s, %.2f us\n",
                l.src.c_str(), l.dst.c_str(), l.peer_access ? 1 : 0, l.peer_gb_s, l.peer_latency_us,
                l.nccl_gb_s, l.nccl_latency_us);
    EXPECT_GT(l.peer_gb_s, 1.0);
    EXPECT_GT(l.peer_latency_us, 0.0);
    EXPECT_LT(l.peer_latency_us, 1e4);
    if (nccl) {
      EXPECT_GT(l.nccl_gb_s, 0.0) << raw["interconnect"].dump();
      EXPECT_GT(l.nccl_latency_us, 0.0);
    }
  }
  std::printf("NCCL: %s\n", raw.value("interconnect_nccl", std::string("?")).c_str());
  // What profile.json gets passes the validating reader.
  nlohmann::json doc;
  doc["ktune_profile"] = profile::kProfileSchemaVersion;
  doc["summary"] = s;
  const profile::ProfileSummary back = profile::parse_profile_summary(doc.dump(), "p.json");
  EXPECT_EQ(back.interconnect.size(), s.interconnect.size());
}

TEST(ProfilerInterconnect, PeerCopiesReachTheTimelineAsTransfers) {
  KTUNE_REQUIRE_GPU();
  if (gpu_count() < 2) GTEST_SKIP() << "one GPU: no peer copy";
  profiler::CuptiSession cupti;
  ASSERT_TRUE(cupti.ok()) << cupti.error();
  int can = 0;
  KTUNE_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, 0, 1));
  if (can != 0) {
    KTUNE_CUDA_CHECK(cudaSetDevice(0));
    if (cudaDeviceEnablePeerAccess(1, 0) != cudaSuccess) cudaGetLastError();  // already on
  }
  const size_t bytes = size_t{8} << 20;
  KTUNE_CUDA_CHECK(cudaSetDevice(1));
  cuda::DeviceBuffer to(bytes);
  KTUNE_CUDA_CHECK(cudaSetDevice(0));
  cuda::DeviceBuffer from(bytes);
  cuda::Stream s;
  cupti.enable();
  KTUNE_CUDA_CHECK(cudaMemcpyPeerAsync(to.data(), 1, from.data(), 0, bytes, s));
  s.synchronize();
  cupti.disable_and_flush();
  profiler::Timeline t;
  cupti.drain_into(t);
  int peer = 0;
  for (const profiler::GpuOp& op : t.ops) {
    if (op.kind != profiler::GpuOpKind::Memcpy || !profiler::is_peer_transfer(t, op)) continue;
    ++peer;
    EXPECT_EQ(op.bytes, int64_t(bytes));
    EXPECT_TRUE((op.device == 0 && op.peer_device == 1) || (op.device == 1 && op.peer_device == 0))
        << op.device << " " << op.peer_device;
  }
  EXPECT_GE(peer, 1);
}

}  // namespace
}  // namespace ktune
