// profile.json's summary: round trip, and the validating reader's errors name the field.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "ktune/engine/error.h"
#include "profiler/profile_summary.h"

namespace ktune::profile {
namespace {

ProfileSummary sample() {
  ProfileSummary s;
  s.kind = "model";
  s.ktune_version = "0.1.0";
  s.commit = "abc1234";
  s.created = "2026-11-27T03:00:00Z";
  s.cpu = {"Xeon",
           16,
           32,
           1,
           "avx512vnni",
           int64_t{128} << 30,
           int64_t{100} << 30,
           {{1, 12.5}, {8, 80.0}, {16, 100.0}}};
  s.cpu_costs.moe_decode_gb_s = {{1, 10.0}, {16, 85.0}};
  s.cpu_costs.handoff_host_thread_us = 20;
  s.gpus.push_back(
      {"cuda:0", "NVIDIA H100", "9.0", int64_t{80} << 30, int64_t{79} << 30, 3000, 50, 50, 5, 16});
  GpuCosts c;
  c.device = "cuda:0";
  c.launch_eager_us = 3.3;
  c.graph_node_us = 1.0;
  c.host_node_us = 27;
  c.flag_handoff_us = 3.4;
  c.sync_us = 10;
  c.matvec_gb_s = 2000;
  c.moe_fused_gb_s = 2200;
  c.moe_unfused_gb_s = 1500;
  c.attention_us = 5;
  c.attention_us_per_1k_ctx = 1;
  c.prefill_gflop_s = 100000;
  s.gpu_costs.push_back(c);
  s.model = {"tiny", "f32", 2, 4, 2, 1000};
  s.router.tokens = 3;
  s.router.counts = {{3, 1, 2, 0}, {0, 0, 3, 3}};
  return s;
}

nlohmann::json doc_of(const ProfileSummary& s) {
  nlohmann::json j;
  j["ktune_profile"] = kProfileSchemaVersion;
  j["summary"] = s;
  return j;
}

std::string error_of(const nlohmann::json& doc) {
  // One file per process and test: ctest runs these tests as parallel processes.
  const std::string path =
      ::testing::TempDir() + "profile_summary_test_" + std::to_string(getpid()) + "_" +
      ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".json";
  {
    std::ofstream out(path);
    out << doc.dump();
  }
  try {
    read_profile_summary(path);
  } catch (const Error& e) {
    std::remove(path.c_str());
    return e.what();
  }
  std::remove(path.c_str());
  return "";
}

TEST(ProfileSummary, KernelCurvesAndHandOffAreOptionalAndRoundTrip) {
  // Files written before the curves read as before: empty curves, zeros.
  const nlohmann::json old_doc = doc_of(sample());
  ASSERT_FALSE(old_doc["summary"]["gpu_costs"][0].contains("kernel_us_by_bytes"));
  ASSERT_FALSE(old_doc["summary"]["cpu_costs"].contains("moe_call_us"));
  ASSERT_FALSE(old_doc["summary"]["cpu_costs"].contains("pcie_assist_gb_s"));
  const ProfileSummary old = summary_from_json(old_doc["summary"], "p.json");
  EXPECT_TRUE(old.gpu_costs[0].matvec_us.empty());
  EXPECT_TRUE(old.gpu_costs[0].moe_fused_us.empty());
  EXPECT_DOUBLE_EQ(old.gpu_costs[0].eager_gap_us, 0);
  EXPECT_DOUBLE_EQ(old.gpu_costs[0].handoff_us, 0);
  EXPECT_DOUBLE_EQ(old.cpu_costs.moe_call_us, 0);
  EXPECT_DOUBLE_EQ(old.cpu_costs.pcie_assist_gb_s, 0);
  EXPECT_DOUBLE_EQ(old.cpu_costs.moe_pcie_ratio, 0);
  // New fields survive a round trip (a version-1 document may carry them too).
  ProfileSummary s = sample();
  GpuCosts& c = s.gpu_costs[0];
  c.matvec_us = {{5898240, 9.4}, {113246208, 117.3}};
  c.router_us = {{1048576, 11.7}};
  c.moe_fused_us = {{21233664, 24.2}, {84934656, 74.2}};
  c.moe_unfused_us = {{884736, 2.5}};
  c.eager_gap_us = 2.3;
  c.handoff_us = 8.6;
  s.cpu_costs.moe_call_us = 8;
  s.cpu_costs.pcie_assist_gb_s = 43.7;
  s.cpu_costs.moe_pcie_ratio = 0.88;
  const nlohmann::json doc = doc_of(s);
  for (int version : {1, kProfileSchemaVersion}) {
    const ProfileSummary r = summary_from_json(doc["summary"], "p.json", version);
    ASSERT_EQ(r.gpu_costs[0].moe_fused_us.size(), 2u);
    EXPECT_DOUBLE_EQ(r.gpu_costs[0].moe_fused_us[1].bytes, 84934656);
    EXPECT_DOUBLE_EQ(r.gpu_costs[0].moe_fused_us[1].us, 74.2);
    EXPECT_EQ(r.gpu_costs[0].matvec_us.size(), 2u);
    EXPECT_EQ(r.gpu_costs[0].router_us.size(), 1u);
    EXPECT_EQ(r.gpu_costs[0].moe_unfused_us.size(), 1u);
    EXPECT_DOUBLE_EQ(r.gpu_costs[0].eager_gap_us, 2.3);
    EXPECT_DOUBLE_EQ(r.gpu_costs[0].handoff_us, 8.6);
    EXPECT_DOUBLE_EQ(r.cpu_costs.moe_call_us, 8);
    EXPECT_DOUBLE_EQ(r.cpu_costs.pcie_assist_gb_s, 43.7);
    EXPECT_DOUBLE_EQ(r.cpu_costs.moe_pcie_ratio, 0.88);
  }
  {  // the PCIe assist's two numbers come together
    nlohmann::json half = doc;
    half["summary"]["cpu_costs"].erase("moe_pcie_ratio");
    EXPECT_NE(error_of(half).find("summary.cpu_costs.moe_pcie_ratio: missing"), std::string::npos)
        << error_of(half);
  }
  // Bad curves name the point.
  nlohmann::json bad = doc;
  bad["summary"]["gpu_costs"][0]["kernel_us_by_bytes"]["moe_fused"][1]["bytes"] = 1000;
  EXPECT_NE(error_of(bad).find("summary.gpu_costs[0].kernel_us_by_bytes.moe_fused[1].bytes: bytes "
                               "must increase"),
            std::string::npos)
      << error_of(bad);
  bad = doc;
  bad["summary"]["gpu_costs"][0]["kernel_us_by_bytes"]["matvec"][0]["us"] = 0;
  EXPECT_NE(error_of(bad).find("kernel_us_by_bytes.matvec[0].us: must be > 0"), std::string::npos)
      << error_of(bad);
  bad = doc;
  bad["summary"]["gpu_costs"][0]["kernel_us_by_bytes"] = 3;
  EXPECT_NE(error_of(bad).find("kernel_us_by_bytes: must be an object"), std::string::npos)
      << error_of(bad);
  bad = doc;
  bad["summary"]["gpu_costs"][0]["handoff_us"] = -1;
  EXPECT_NE(error_of(bad).find("gpu_costs[0].handoff_us"), std::string::npos) << error_of(bad);
}

TEST(ProfileSummary, RecordedProfilesReadWithTheirCurves) {
  // The committed recordings carry the measured curves; the hand-made examples do not.
  const std::string dir = std::string(KTUNE_TEST_DATA) + "/../../profiles/";
  for (const char* name :
       {"h100-16core.json", "h100x2-nvlink.json", "h100x4-nvlink.json", "h200-16core.json",
        "h200x4-nvlink.json"}) {
    const ProfileSummary s = read_profile_summary(dir + name);
    for (const GpuCosts& c : s.gpu_costs) {
      EXPECT_GE(c.matvec_us.size(), 2u) << name;
      EXPECT_GE(c.moe_fused_us.size(), 2u) << name;
      EXPECT_GT(c.handoff_us, 0) << name;
      EXPECT_GT(c.eager_gap_us, 0) << name;
    }
  }
  const ProfileSummary hand = read_profile_summary(dir + "h100-16core-handmade.json");
  EXPECT_TRUE(hand.gpu_costs[0].moe_fused_us.empty());
}

TEST(ProfileSummary, RoundTripsThroughJson) {
  const ProfileSummary s = sample();
  const nlohmann::json j = doc_of(s);
  const ProfileSummary back = summary_from_json(j["summary"], "x.json");
  nlohmann::json again;
  to_json(again, back);
  EXPECT_EQ(again, j["summary"]);
  EXPECT_EQ(back.router.counts[1][3], 3);
  EXPECT_DOUBLE_EQ(back.gpu_costs[0].flag_handoff_us, 3.4);
  EXPECT_EQ(error_of(j), "");
}

TEST(ProfileSummary, ErrorsNameTheField) {
  nlohmann::json j = doc_of(sample());
  j["summary"]["gpus"][0]["read_gb_s"] = -1;
  EXPECT_NE(error_of(j).find("summary.gpus[0].read_gb_s"), std::string::npos) << error_of(j);

  j = doc_of(sample());
  j["summary"]["cpu"].erase("isa");
  EXPECT_NE(error_of(j).find("summary.cpu.isa: missing"), std::string::npos) << error_of(j);

  j = doc_of(sample());
  j["summary"]["router"]["counts"][0][0] = 2;  // sum no longer tokens * top-k
  EXPECT_NE(error_of(j).find("summary.router.counts[0]: counts sum to 5"), std::string::npos)
      << error_of(j);

  j = doc_of(sample());
  j["summary"]["cpu"]["read_gb_s"][1]["threads"] = 1;
  EXPECT_NE(error_of(j).find("thread counts must increase"), std::string::npos) << error_of(j);

  j = doc_of(sample());
  j["ktune_profile"] = 99;
  EXPECT_NE(error_of(j).find("newer than this ktune reads"), std::string::npos);

  j = doc_of(sample());
  j["summary"]["gpu_costs"][0]["device"] = "cuda:1";
  EXPECT_NE(error_of(j).find("does not match gpus[0]"), std::string::npos);

  EXPECT_NE(error_of(nlohmann::json::array()).find("not a ktune profile"), std::string::npos);
}

// Schema 2: GPU links and per-node CPU expert curves round-trip and are validated; a version-1
// document (without them) still reads, with both empty; a version-2 one must have them.
ProfileSummary two_gpus() {
  ProfileSummary s = sample();
  s.cpu.numa_nodes = 2;
  s.gpus.push_back(s.gpus[0]);
  s.gpus[1].device = "cuda:1";
  s.gpu_costs.push_back(s.gpu_costs[0]);
  s.gpu_costs[1].device = "cuda:1";
  s.interconnect = {{"cuda:0", "cuda:1", true, 150, 10, 140, 12},
                    {"cuda:1", "cuda:0", true, 149, 11, 0, 0}};
  s.cpu_costs.moe_decode_gb_s_per_node = {{0, {{1, 9}, {8, 40}}}, {1, {{1, 8}, {8, 38}}}};
  return s;
}

TEST(ProfileSummary, SchemaTwoLinksAndNodesRoundTrip) {
  const nlohmann::json j = doc_of(two_gpus());
  EXPECT_EQ(error_of(j), "");
  const ProfileSummary back = summary_from_json(j["summary"], "x.json");
  ASSERT_EQ(back.interconnect.size(), 2u);
  EXPECT_DOUBLE_EQ(back.interconnect[0].nccl_latency_us, 12);
  const GpuLink* l = find_link(back, "cuda:1", "cuda:0");
  ASSERT_NE(l, nullptr);
  EXPECT_DOUBLE_EQ(l->peer_gb_s, 149);
  EXPECT_EQ(find_link(back, "cuda:0", "cuda:2"), nullptr);
  ASSERT_EQ(back.cpu_costs.moe_decode_gb_s_per_node.size(), 2u);
  EXPECT_DOUBLE_EQ(back.cpu_costs.moe_decode_gb_s_per_node[1].gb_s[1].value, 38);
  nlohmann::json again;
  to_json(again, back);
  EXPECT_EQ(again, j["summary"]);
}

TEST(ProfileSummary, VersionOneStillReadsAndVersionTwoNeedsTheNewFields) {
  nlohmann::json j = doc_of(sample());
  j["ktune_profile"] = 1;
  j["summary"].erase("interconnect");
  j["summary"]["cpu_costs"].erase("moe_decode_gb_s_per_node");
  EXPECT_EQ(error_of(j), "");
  const ProfileSummary v1 = parse_profile_summary(j.dump(), "v1.json");
  EXPECT_TRUE(v1.interconnect.empty());
  EXPECT_TRUE(v1.cpu_costs.moe_decode_gb_s_per_node.empty());
  j["ktune_profile"] = 2;
  EXPECT_NE(error_of(j).find("summary.cpu_costs.moe_decode_gb_s_per_node: missing"),
            std::string::npos)
      << error_of(j);
  j["summary"]["cpu_costs"]["moe_decode_gb_s_per_node"] = nlohmann::json::array();
  EXPECT_NE(error_of(j).find("summary.interconnect: missing"), std::string::npos) << error_of(j);
}

TEST(ProfileSummary, BadLinksAndNodesNameTheField) {
  nlohmann::json j = doc_of(two_gpus());
  j["summary"]["interconnect"][0]["dst"] = "cuda:7";
  EXPECT_NE(error_of(j).find("summary.interconnect[0].dst"), std::string::npos) << error_of(j);
  j = doc_of(two_gpus());
  j["summary"]["interconnect"][1] = j["summary"]["interconnect"][0];
  EXPECT_NE(error_of(j).find("repeats the link"), std::string::npos) << error_of(j);
  j = doc_of(two_gpus());
  j["summary"]["interconnect"][0]["peer_gb_s"] = -3;
  EXPECT_NE(error_of(j).find("summary.interconnect[0].peer_gb_s"), std::string::npos);
  j = doc_of(two_gpus());
  j["summary"]["cpu_costs"]["moe_decode_gb_s_per_node"][1]["node"] = 5;
  EXPECT_NE(error_of(j).find("moe_decode_gb_s_per_node[1].node"), std::string::npos) << error_of(j);
}

TEST(ProfileSummary, RateInterpolatesAndClamps) {
  const std::vector<ThreadRate> c = {{1, 10}, {8, 80}, {16, 100}};
  EXPECT_DOUBLE_EQ(rate_at(c, 1), 10);
  EXPECT_DOUBLE_EQ(rate_at(c, 4), 40);
  EXPECT_DOUBLE_EQ(rate_at(c, 12), 90);
  EXPECT_DOUBLE_EQ(rate_at(c, 64), 100);
  EXPECT_DOUBLE_EQ(rate_at(c, 0), 10);
}

}  // namespace
}  // namespace ktune::profile

namespace ktune::profile {
namespace {

TEST(ProfileSummary, NestingBombsAreRefusedBeforeParsing) {
  const std::string bomb =
      "{\"ktune_profile\": 1, \"x\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  try {
    parse_profile_summary(bomb, "bomb.json");
    FAIL() << "expected ktune::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nested deeper than 64"), std::string::npos) << e.what();
  }
  // Brackets inside strings (escaped quotes too) do not count.
  check_json_depth("{\"a\": \"[[[[\\\"[[[[\", \"b\": [[1]]}", "x.json", 3);
  EXPECT_THROW(check_json_depth("[[[[1]]]]", "x.json", 3), Error);
  EXPECT_THROW(parse_profile_summary("{\"ktune_profile\": 1, \"summary\": [", "t.json"), Error);
}

}  // namespace
}  // namespace ktune::profile
