// `ktune run --batch` and `--prompt TEXT`, `ktune tokenize`: the KV cache planned per sequence,
// the expected distinct experts of a batch, layer splits over GPUs refusing batches, batch lists,
// text generation on the synthetic vocabulary and on a GGUF's own, and tokenizer errors naming
// the GGUF key.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/placement.h"
#include "ktune/engine/tokenizer.h"
#include "run_bench.h"
#include "subprocess.h"

namespace {

using ktune::Device;
using ktune::QuantType;
using ktune::test::run_ktune;

ktune::Budgets no_budgets() { return ktune::Budgets{}; }

TEST(BatchPlan, KvCacheCountsEverySequence) {
  const ktune::ModelConfig& q = *ktune::find_preset("qwen3-30b-a3b");
  auto p = ktune::make_uniform_placement(q, Device::cpu(), Device::cpu());
  p.runtime.context = 1024;
  p.runtime.batch = 1;
  const auto one = ktune::plan_memory(q, QuantType::Q4_0, QuantType::Q4_0, p, no_budgets());
  p.runtime.batch = 8;
  const auto eight = ktune::plan_memory(q, QuantType::Q4_0, QuantType::Q4_0, p, no_budgets());
  // f32 K and V on the CPU: 48 layers x 2 x 1024 positions x 4 kv heads x 128 x 4 bytes.
  const int64_t per_seq = int64_t{48} * 2 * 1024 * 4 * 128 * 4;
  EXPECT_EQ(one.per_device.at("cpu").kv_cache, per_seq);
  EXPECT_EQ(eight.per_device.at("cpu").kv_cache, 8 * per_seq);  // 768 MiB
  EXPECT_EQ(eight.per_device.at("cpu").weights, one.per_device.at("cpu").weights);
  // deepseek-v3 on a GPU: the MLA latent + roped key (512 + 64) in f32 (the GPU engine keeps
  // the CPU engine's numbers), per sequence.
  const ktune::ModelConfig& d = *ktune::find_preset("deepseek-v3");
  auto g = ktune::make_uniform_placement(d, Device::cuda(0), Device::cpu());
  g.runtime.context = 4096;
  g.runtime.batch = 4;
  const auto dp = ktune::plan_memory(d, QuantType::Q4_K, QuantType::Q4_K, g, no_budgets());
  EXPECT_EQ(dp.per_device.at("cuda:0").kv_cache, int64_t{61} * 4096 * 4 * 576 * 4);
}

TEST(BatchPlan, ExpectedDistinctExpertsUnderUniformRouting) {
  using ktune::cli::expected_distinct_experts;
  EXPECT_DOUBLE_EQ(expected_distinct_experts(128, 8, 1), 8.0);
  EXPECT_NEAR(expected_distinct_experts(128, 8, 2), 8 + 8 * (1 - 8.0 / 128), 1e-12);
  EXPECT_NEAR(expected_distinct_experts(128, 8, 32), 128 * (1 - std::pow(120.0 / 128, 32)), 1e-9);
  EXPECT_LT(expected_distinct_experts(128, 8, 32), 128.0);
  EXPECT_DOUBLE_EQ(expected_distinct_experts(8, 8, 4), 8.0);
}

TEST(RunBatchCli, BadBatchesAreUsageOrRuntimeErrors) {
  auto r = run_ktune({"run", "--batch", "33", "-p", "4", "-n", "4", "--no-probe"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--batch"), std::string::npos) << r.err;
  r = run_ktune({"run", "--batch", "1,33", "-p", "4", "-n", "4", "--no-probe"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("33 is not 1..32"), std::string::npos) << r.err;
  // A layer split over GPUs decodes one sequence: refused before the plan is checked (no GPU
  // needed); one GPU takes the batch (here: no GPU, so the device check refuses it).
  r = run_ktune({"run", "--batch", "2", "--gpus", "2", "-p", "4", "-n", "4"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("batch 2: the gpu engine decodes several sequences on cuda:0 alone"),
            std::string::npos)
      << r.err;
  r = run_ktune({"run", "--batch", "2", "--experts-on-gpu", "0", "-p", "4", "-n", "4"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(r.err.find("decodes several sequences"), std::string::npos) << r.err;
  // deepseek2 (MLA) batches too.
  r = run_ktune({"run", "--model", "synth:tiny-deepseek", "--batch", "2", "-p", "4", "-n", "4",
                 "--no-probe", "-r", "1", "-t", "2"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST(RunBatchCli, BatchedBenchmarkReportsAggregateAndPerSequence) {
  const auto r = run_ktune(
      {"run", "--batch", "3", "-p", "4", "-n", "4", "-r", "1", "-t", "2", "--no-probe", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("batch"), 3);
  const double agg = j.at("decode_tok_s").at("mean");
  const double per = j.at("decode_tok_s_per_sequence").at("mean");
  EXPECT_GT(per, 0.0);
  EXPECT_NEAR(agg, 3 * per, 1e-6 * agg);
}

TEST(RunBatchCli, BatchListGivesRowsPerBatch) {
  const auto r = run_ktune({"run", "--batch", "1,3", "-p", "4", "-n", "4", "-r", "1", "-t", "2",
                            "--no-probe", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("batches"), nlohmann::json::array({1, 3}));
  const auto& runs = j.at("runs");
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0].at("batch"), 1);
  EXPECT_EQ(runs[1].at("batch"), 3);
  // Prefill is measured once per thread count (with the first batch).
  EXPECT_EQ(runs[0].at("prefill_tok_s").at("samples").size(), 1u);
  EXPECT_EQ(runs[1].at("prefill_tok_s").at("samples").size(), 0u);
  const double agg = runs[1].at("decode_tok_s").at("mean");
  const double per = runs[1].at("decode_tok_s_per_sequence").at("mean");
  EXPECT_NEAR(agg, 3 * per, 1e-6 * agg);
  // The table: a tg row per batch, the batched one with its per-sequence row.
  const auto t = run_ktune(
      {"run", "--batch", "1,3", "-p", "0", "-n", "4", "-r", "1", "-t", "2", "--no-probe"});
  ASSERT_EQ(t.exit_code, 0) << t.err;
  EXPECT_NE(t.out.find(" tg4 |"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("tg4 x3 /seq"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("# batch: 3 sequences"), std::string::npos) << t.out;
  // Text generation takes one batch size.
  const auto g = run_ktune({"run", "--prompt", "Hi", "--batch", "1,2", "-n", "2"});
  EXPECT_EQ(g.exit_code, 2) << g.err;
}

TEST(BatchPlan, GpuKvCacheAndBatchWorkspacePerSequenceAndRefusal) {
  const ktune::ModelConfig& q = *ktune::find_preset("qwen3-30b-a3b");
  auto p = ktune::make_uniform_placement(q, Device::cuda(0), Device::cuda(0));
  p.runtime.context = 4096;
  p.runtime.batch = 1;
  const auto one = ktune::plan_memory(q, QuantType::Q4_0, QuantType::Q4_0, p, no_budgets());
  p.runtime.batch = 32;
  const auto many = ktune::plan_memory(q, QuantType::Q4_0, QuantType::Q4_0, p, no_budgets());
  // f16 K and V on the GPU: 48 layers x 2 x 4096 positions x 4 kv heads x 128 x 2 bytes each.
  const int64_t per_seq = int64_t{48} * 2 * 4096 * 4 * 128 * 2;
  const auto& g1 = one.per_device.at("cuda:0");
  const auto& g32 = many.per_device.at("cuda:0");
  EXPECT_EQ(g1.kv_cache, per_seq);
  EXPECT_EQ(g32.kv_cache, 32 * per_seq);  // 12 GiB
  EXPECT_EQ(g32.weights, g1.weights);
  // The batched decode state (the engine's arena, by the same formula) is counted on top.
  const int64_t bw = ktune::batch_decode_workspace_bytes(q, 32, 4096);
  EXPECT_GT(bw, 32 * 4 * q.vocab);  // at least the logits
  EXPECT_GE(g32.workspace - g1.workspace, bw);
  EXPECT_GT(bw, ktune::batch_decode_workspace_bytes(q, 16, 4096));
  // A batch that does not fit is refused naming the device, the need and the budget (and the
  // batch in the advice); the same placement with one sequence fits.
  ktune::Budgets b;
  b.bytes["cuda:0"] = 24 * ktune::kGiB;
  p.runtime.batch = 1;
  EXPECT_NO_THROW(ktune::check_fits(ktune::plan_memory(q, QuantType::Q4_0, QuantType::Q4_0, p, b)));
  p.runtime.batch = 32;
  try {
    ktune::check_fits(ktune::plan_memory(q, QuantType::Q4_0, QuantType::Q4_0, p, b));
    FAIL() << "a batch of 32 fits 24 GiB";
  } catch (const ktune::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cuda:0: the plan needs"), std::string::npos) << m;
    EXPECT_NE(m.find("KV cache 12.0"), std::string::npos) << m;
    EXPECT_NE(m.find("but the budget is 24.0 GiB"), std::string::npos) << m;
    EXPECT_NE(m.find("runtime.batch 32, --batch"), std::string::npos) << m;
  }
}

TEST(RunTextCli, GeneratesTextOnTheSyntheticVocabulary) {
  auto r = run_ktune({"run", "--prompt", "The model reads", "-n", "6", "-t", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_TRUE(j.at("tokenizer").at("synthetic").get<bool>());
  ASSERT_EQ(j.at("sequences").size(), 1u);
  const auto& s = j.at("sequences")[0];
  EXPECT_EQ(s.at("prompt"), "The model reads");
  const ktune::Tokenizer tok = ktune::Tokenizer::synthetic(1024);
  EXPECT_EQ(s.at("prompt_ids").get<std::vector<int32_t>>(), tok.encode("The model reads"));
  const auto ids = s.at("ids").get<std::vector<int32_t>>();
  EXPECT_GE(ids.size(), 1u);
  EXPECT_LE(ids.size(), 6u);
  // A batch of two sequences of different prompts: the first equals the single run.
  r = run_ktune({"run", "--prompt", "The model reads", "--prompt", "Experts", "--batch", "2", "-n",
                 "6", "-t", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j.at("sequences").size(), 2u);
  EXPECT_EQ(j.at("sequences")[0].at("ids").get<std::vector<int32_t>>(), ids);
  EXPECT_EQ(j.at("sequences")[1].at("prompt"), "Experts");
  // Text output streams the prompt and the continuation on stdout, rates on stderr.
  r = run_ktune({"run", "--prompt", "Hello there", "-n", "4", "-t", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("Hello there", 0), 0u) << r.out;
  EXPECT_NE(r.err.find("gibberish"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tok/s per sequence"), std::string::npos) << r.err;
  // -p N stays the benchmark's prompt length; a number as text needs --prompt-text.
  r = run_ktune({"run", "--prompt-text", "42", "-n", "2", "-t", "1", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out).at("sequences")[0].at("prompt"), "42");
  r = run_ktune({"run", "-p", "-3", "-n", "2"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
}

// A GGUF holding only tokenizer metadata (no tensors), written to a temporary file.
std::string write_tokenizer_gguf(const std::string& name, const ktune::gguf::Writer& w) {
  const std::string path = ::testing::TempDir() + name;
  w.write(path, [](size_t, const ktune::gguf::TensorInfo&, ktune::gguf::ByteSink&) {});
  return path;
}

TEST(TokenizeCli, ReadsTheGgufVocabularyAndNamesBadKeys) {
  const ktune::Tokenizer t = ktune::Tokenizer::synthetic(700);
  ktune::gguf::Writer w;
  t.write_gguf_metadata(w);
  const std::string good = write_tokenizer_gguf("tok_good.gguf", w);
  const std::string text = "It's 2026: naïve 😀 <|im_start|>hi";
  auto r = run_ktune({"tokenize", "--model", good, text, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_FALSE(j.at("tokenizer").at("synthetic").get<bool>());
  EXPECT_EQ(j.at("tokenizer").at("pre"), "qwen2");
  EXPECT_EQ(j.at("ids").get<std::vector<int32_t>>(), t.encode(text));
  r = run_ktune({"tokenize", "--model", good, "--no-special", "<|im_start|>"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find(std::to_string(t.size() - 2)), std::string::npos) << r.out;

  w.set("tokenizer.ggml.merges",
        ktune::gguf::Value::make_array(ktune::gguf::ValueType::STRING,
                                       {ktune::gguf::Value::string("nospace")}));
  const std::string bad = write_tokenizer_gguf("tok_bad.gguf", w);
  r = run_ktune({"tokenize", "--model", bad, "x"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("tokenizer.ggml.merges"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(bad), std::string::npos) << r.err;
  r = run_ktune({"run", "--model", bad, "--prompt", "hello", "-n", "2"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("tokenizer.ggml.merges"), std::string::npos) << r.err;
}

}  // namespace

namespace {

TEST(ProfileBatchCli, WindowsAndRouterCountEverySequence) {
  const std::string out =
      ::testing::TempDir() + "batch_profile_" + std::to_string(getpid()) + ".json";
  const auto r = ktune::test::run_ktune({"profile", "--model", "synth:tiny", "--batch", "3", "-n",
                                         "4", "-p", "0", "--quick", "-q", "-t", "2", "-o", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::ifstream in(out);
  const auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j.at("run").at("batch"), 3);
  EXPECT_EQ(j.at("run").at("decode_tokens"), 4);
  EXPECT_EQ(j.at("summary").at("router").at("tokens"), 12);
}

}  // namespace
