// The CLI as a user sees it: exit codes, one-line errors of the fixed shape for every kind of bad
// input, --help that teaches, JSON that parses.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "subprocess.h"

namespace fs = std::filesystem;
using ktune::test::count_lines;
using ktune::test::ProcessResult;
using ktune::test::run_ktune;

namespace {

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("ktune_cli_" + std::to_string(getpid()));
    fs::create_directories(dir_);
    good_ = (dir_ / "tiny.gguf").string();
    ProcessResult r = run_ktune({"gen-model", "--preset", "tiny", "--quant", "Q8_0", "--seed",
                                 "7", "-q", "-o", good_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  static std::string bytes_of(const std::string& path) { return ktune::test::read_all(path); }
  static std::string write(const std::string& name, const std::string& bytes) {
    std::string p = (dir_ / name).string();
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
  // The contract for bad input: exit code `code`, no signal, exactly one stderr line of the
  // form "ktune: error: <where>: <problem>; <what to do>" that mentions `needle`.
  static void expect_one_line_error(const ProcessResult& r, int code, const std::string& needle) {
    EXPECT_FALSE(r.signaled) << "signal " << r.signal << "\n" << r.err;
    EXPECT_EQ(r.exit_code, code) << r.err;
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
    // Shape: "ktune: error: <where>: <problem>; <what to do>\n".
    const std::string prefix = "ktune: error: ";
    EXPECT_EQ(r.err.rfind(prefix, 0), 0u) << r.err;
    const size_t colon = r.err.find(": ", prefix.size());
    EXPECT_NE(colon, std::string::npos) << r.err;
    EXPECT_NE(r.err.find("; ", colon == std::string::npos ? 0 : colon), std::string::npos) << r.err;
    EXPECT_EQ(r.err.back(), '\n');
    EXPECT_NE(r.err.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.err;
  }
  // Patches the 4-byte type id of tensor `name` in a GGUF header (just after its dims).
  static std::string with_tensor_type(const std::string& file, const std::string& name,
                                      uint32_t type) {
    std::string b = file;
    const size_t at = b.find(name);
    EXPECT_NE(at, std::string::npos);
    size_t p = at + name.size();
    uint32_t n_dims;
    std::memcpy(&n_dims, &b[p], 4);
    p += 4 + 8 * n_dims;
    std::memcpy(&b[p], &type, 4);
    return b;
  }

  static fs::path dir_;
  static std::string good_;
};
fs::path CliTest::dir_;
std::string CliTest::good_;

TEST_F(CliTest, NoArgumentsIsUsageError) {
  expect_one_line_error(run_ktune({}), 2, "subcommand");
}

TEST_F(CliTest, UnknownOptionIsUsageError) {
  expect_one_line_error(run_ktune({"run", "--bogus"}), 2, "--bogus");
}

TEST_F(CliTest, HelpOfEverySubcommandTeachesWithAnExample) {
  for (const char* cmd : {"run", "logits", "gen-model", "convert", "probe", "info"}) {
    ProcessResult r = run_ktune({cmd, "--help"});
    EXPECT_EQ(r.exit_code, 0) << cmd;
    EXPECT_NE(r.out.find("Example: ktune " + std::string(cmd)), std::string::npos)
        << cmd << ":\n" << r.out;
  }
}

TEST_F(CliTest, MissingFile) {
  expect_one_line_error(run_ktune({"logits", "--model", (dir_ / "nope.gguf").string(),
                                   "--tokens", "1"}),
                        1, "nope.gguf");
}

TEST_F(CliTest, WrongMagic) {
  std::string b = bytes_of(good_);
  std::memcpy(&b[0], "GGML", 4);
  expect_one_line_error(run_ktune({"logits", "--model", write("magic.gguf", b), "--tokens", "1"}),
                        1, "magic.gguf");
}

TEST_F(CliTest, TruncatedHeader) {
  std::string b = bytes_of(good_).substr(0, 100);
  expect_one_line_error(run_ktune({"logits", "--model", write("trunc.gguf", b), "--tokens", "1"}),
                        1, "trunc.gguf");
}

TEST_F(CliTest, TensorDataOutOfBounds) {
  std::string b = bytes_of(good_);
  b.resize(b.size() - 1000);  // header intact, the last tensor's data runs past the end
  expect_one_line_error(run_ktune({"logits", "--model", write("oob.gguf", b), "--tokens", "1"}),
                        1, "oob.gguf");
}

TEST_F(CliTest, AbsurdTensorCount) {
  std::string b = bytes_of(good_);
  const uint64_t huge = uint64_t(1) << 60;
  std::memcpy(&b[8], &huge, 8);  // header: magic u32, version u32, tensor count u64, kv count u64
  expect_one_line_error(run_ktune({"logits", "--model", write("count.gguf", b), "--tokens", "1"}),
                        1, "count.gguf");
}

TEST_F(CliTest, UnknownArchitecture) {
  std::string b = bytes_of(good_);
  const size_t at = b.find("qwen3moe");  // value of general.architecture comes first
  ASSERT_NE(at, std::string::npos);
  b.replace(at, 8, "qwen9moe");
  expect_one_line_error(run_ktune({"logits", "--model", write("arch.gguf", b), "--tokens", "1"}),
                        1, "qwen9moe");
}

TEST_F(CliTest, UnsupportedQuantType) {
  // IQ2_XXS (ggml type 16) is a real ggml type ktune does not compute with.
  std::string b = with_tensor_type(bytes_of(good_), "blk.0.ffn_up_exps.weight", 16);
  expect_one_line_error(run_ktune({"logits", "--model", write("iq2.gguf", b), "--tokens", "1"}),
                        1, "IQ2_XXS");
}

TEST_F(CliTest, ShapeMismatch) {
  // Declare attn_q as F32 instead of Q8_0 with the same shape: a type the loader accepts, but
  // then make the model's declared expert count disagree with the tensors.
  std::string b = bytes_of(good_);
  const std::string key = "qwen3moe.expert_count";
  const size_t at = b.find(key);
  ASSERT_NE(at, std::string::npos);
  const size_t value_at = at + key.size() + 4;  // after the u32 value type
  uint32_t experts;
  std::memcpy(&experts, &b[value_at], 4);
  experts *= 2;
  std::memcpy(&b[value_at], &experts, 4);
  expect_one_line_error(run_ktune({"logits", "--model", write("shape.gguf", b), "--tokens", "1"}),
                        1, "shape");
}

TEST_F(CliTest, TokenOutsideVocabularyIsUsageError) {
  expect_one_line_error(run_ktune({"logits", "--model", good_, "--tokens", "1,99999"}), 2,
                        "99999");
}

TEST_F(CliTest, UnknownQuantAndPresetAreUsageErrors) {
  expect_one_line_error(run_ktune({"gen-model", "--quant", "q3_z", "-o", (dir_ / "x").string()}),
                        2, "q3_z");
  expect_one_line_error(
      run_ktune({"gen-model", "--preset", "llama-7b", "-o", (dir_ / "x").string()}), 2,
      "llama-7b");
  expect_one_line_error(run_ktune({"run", "--model", "synth:nope"}), 2, "nope");
  EXPECT_FALSE(fs::exists(dir_ / "x"));
}

TEST_F(CliTest, QuantNamesAreCaseInsensitive) {
  for (const char* q : {"q4_0", "Q4_0"}) {
    const std::string out = (dir_ / (std::string("case_") + q + ".gguf")).string();
    ProcessResult r = run_ktune({"gen-model", "--preset", "tiny", "--quant", q, "-q", "-o", out});
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
  EXPECT_EQ(bytes_of((dir_ / "case_q4_0.gguf").string()),
            bytes_of((dir_ / "case_Q4_0.gguf").string()));
}

TEST_F(CliTest, BadThreadsIsUsageError) {
  expect_one_line_error(run_ktune({"run", "--model", good_, "--threads", "0"}), 2, "--threads");
}

TEST_F(CliTest, DirectoryThatIsNotACheckpoint) {
  expect_one_line_error(run_ktune({"logits", "--model", dir_.string(), "--tokens", "1"}), 1,
                        "config.json");
}

TEST_F(CliTest, LogitsJsonHasPrefillAndDecodeRows) {
  ProcessResult r = run_ktune({"logits", "--model", good_, "--tokens", "5,77,300", "--then",
                               "17,230", "--json", "--threads", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto doc = nlohmann::json::parse(r.out);
  ASSERT_EQ(doc["prefill"].size(), 3u);
  ASSERT_EQ(doc["decode"].size(), 2u);
  EXPECT_EQ(doc["prefill"][0].size(), 1024u);  // tiny's vocabulary
  // The same file through synth: gives the same logits (same preset, quant and seed).
  ProcessResult s = run_ktune({"logits", "--model", "synth:tiny:q8_0", "--tokens", "5,77,300",
                               "--then", "17,230", "--json", "--threads", "1"});
  ASSERT_EQ(s.exit_code, 0) << s.err;
  auto doc1 = nlohmann::json::parse(s.out);
  ProcessResult g7 = run_ktune({"gen-model", "--preset", "tiny", "--quant", "q8_0", "--seed", "1",
                                "-q", "-o", (dir_ / "seed1.gguf").string()});
  ASSERT_EQ(g7.exit_code, 0);
  ProcessResult f1 = run_ktune({"logits", "--model", (dir_ / "seed1.gguf").string(), "--tokens",
                                "5,77,300", "--then", "17,230", "--json", "--threads", "1"});
  ASSERT_EQ(f1.exit_code, 0) << f1.err;
  EXPECT_EQ(nlohmann::json::parse(f1.out), doc1);
}

TEST_F(CliTest, RunJsonIsOneDocumentWithStats) {
  ProcessResult r = run_ktune({"run", "--model", good_, "-p", "16", "-n", "8", "-r", "2",
                               "--threads", "1", "--json", "--no-probe"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto doc = nlohmann::json::parse(r.out);  // throws if there is anything but one document
  for (const char* k : {"prefill_tok_s", "decode_tok_s"}) {
    ASSERT_TRUE(doc.contains(k)) << k;
    EXPECT_GT(doc[k]["mean"].get<double>(), 0.0);
    EXPECT_EQ(doc[k]["samples"].size(), 2u);
    EXPECT_GE(doc[k]["stddev"].get<double>(), 0.0);
  }
  for (const char* k : {"cpu", "commit", "model", "quant", "threads"}) EXPECT_TRUE(doc.contains(k)) << k;
  EXPECT_EQ(doc["quant"], "Q8_0");
  EXPECT_EQ(doc["threads"], 1);
}

TEST_F(CliTest, RunTableDescribesItself) {
  ProcessResult r = run_ktune({"run", "--model", "synth:tiny", "-p", "16", "-n", "8", "-r", "2",
                               "--threads", "1,2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* s : {"# ktune run", "commit", "# cpu:", "# model: synth:tiny", "DRAM read",
                        "memory-bound limit", "pp16", "tg8", "±"}) {
    EXPECT_NE(r.out.find(s), std::string::npos) << s << "\n" << r.out;
  }
}

TEST_F(CliTest, PlainRunKeepsItsTableWithoutPlacementLines) {
  // A plain --model run (no placement flag) is the CpuEngine benchmark as before: same header
  // and columns, no placement summary.
  ProcessResult r = run_ktune({"run", "--model", good_, "-p", "8", "-n", "4", "-r", "1",
                               "--threads", "1", "--no-probe"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("| quant    | threads |    test |"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("# placement"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("| placement |"), std::string::npos) << r.out;
}

TEST_F(CliTest, RunHelpTeachesThePlacementFlags) {
  ProcessResult r = run_ktune({"run", "--help"});
  ASSERT_EQ(r.exit_code, 0);
  for (const char* s : {"--config", "--experts-on-gpu", "--cuda-graph", "--moe-kernel",
                        "--gpu-mem", "--cpu-mem", "KTUNE_CUDA_GRAPH=0"}) {
    EXPECT_NE(r.out.find(s), std::string::npos) << s;
  }
}

TEST_F(CliTest, GenModelWritesAtomically) {
  // An output under a missing folder fails cleanly and leaves nothing behind.
  expect_one_line_error(run_ktune({"gen-model", "--preset", "tiny", "-q", "-o",
                                   (dir_ / "missing" / "m.gguf").string()}),
                        1, "missing");
  for (const auto& e : fs::directory_iterator(dir_)) {
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << e.path();
  }
}

}  // namespace
