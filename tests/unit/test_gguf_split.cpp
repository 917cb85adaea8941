// Real users' files: split GGUF sets (llama.cpp's gguf-split layout) load from their first part,
// files that mix tensor types (Q4_K_M) load and run on the CPU engine, a type ktune cannot read
// is a clean error naming the tensor, and `ktune quantize` writes the mixes. Every file here is
// written by ktune's own GGUF writer (and ktune quantize) in a temp folder.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/model.h"
#include "ktune/engine/quantize.h"
#include "ktune/engine/synthetic.h"
#include "unit/subprocess.h"

namespace ktune {
namespace {

namespace fs = std::filesystem;
using gguf::Value;

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "ktune_split_XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Per-part edits for the error tests.
struct SplitEdits {
  int64_t count_in_part = -1;  // part index whose split.count is written wrong (count + 1)
  int64_t no_in_part = -1;     // part index whose split.no is written wrong (+ 1)
  int64_t tensors_count_delta = 0;
  bool duplicate_first_tensor_in_last_part = false;
};

// Splits the GGUF `src` into `parts` files PREFIX-0000i-of-0000N.gguf as llama.cpp's gguf-split
// does: all metadata in the first part; split.no (u16, 0-based), split.count (u16) and
// split.tensors.count (i32) in every part; tensors in file order, spread evenly.
std::vector<std::string> write_split(const std::string& src, const std::string& prefix, int parts,
                                     const SplitEdits& edits = {}) {
  const gguf::File f = gguf::File::open(src);
  const size_t n = f.tensors().size();
  std::vector<std::string> paths;
  for (int p = 0; p < parts; ++p) {
    gguf::Writer w;
    if (p == 0) {
      for (const auto& kv : f.metadata()) w.set(kv.first, kv.second);
    }
    const int count = parts + (edits.count_in_part == p ? 1 : 0);
    w.set("split.no", Value::u16(static_cast<uint16_t>(p + (edits.no_in_part == p ? 1 : 0))));
    w.set("split.count", Value::u16(static_cast<uint16_t>(count)));
    w.set("split.tensors.count",
          Value::i32(static_cast<int32_t>(static_cast<int64_t>(n) + edits.tensors_count_delta)));
    std::vector<const gguf::TensorInfo*> mine;
    for (size_t k = n * p / parts; k < n * (p + 1) / parts; ++k) mine.push_back(&f.tensors()[k]);
    if (edits.duplicate_first_tensor_in_last_part && p == parts - 1) {
      mine.push_back(&f.tensors()[0]);
    }
    for (const gguf::TensorInfo* t : mine) w.add_tensor(t->name, t->ne, t->quant());
    char name[64];
    std::snprintf(name, sizeof name, "-%05d-of-%05d.gguf", p + 1, parts);
    paths.push_back(prefix + name);
    w.write(paths.back(), [&](size_t i, const gguf::TensorInfo&, gguf::ByteSink& out) {
      out.write(mine[i]->data, mine[i]->nbytes);
    });
  }
  return paths;
}

std::vector<float> logits_of(const ModelWeights& w, const std::vector<int32_t>& tokens) {
  CpuEngineOptions opt;
  opt.threads = 2;
  opt.max_context = 16;
  CpuEngine e(w, opt);
  std::vector<float> all, one;
  for (int32_t t : tokens) {
    e.decode(t, &one);
    all.insert(all.end(), one.begin(), one.end());
  }
  return all;
}

const std::vector<int32_t> kTokens = {5, 77, 300, 1000, 12};

class SplitAndMixed : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir;
    SynthOptions o;
    o.preset = "tiny";
    o.quant = QuantType::F32;
    o.seed = 9;
    f32_ = dir_->file("tiny-f32.gguf");
    write_synthetic_gguf(o, f32_);
    mixed_ = dir_->file("tiny-q4_k_m.gguf");
    QuantizeOptions q;
    q.mix = QuantMix::Q4_K_M;
    q.threads = 2;
    report_ = quantize_gguf(f32_, mixed_, q);
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static TempDir* dir_;
  static std::string f32_, mixed_;
  static QuantizeReport report_;
};
TempDir* SplitAndMixed::dir_ = nullptr;
std::string SplitAndMixed::f32_, SplitAndMixed::mixed_;
QuantizeReport SplitAndMixed::report_;

// tiny: 4 layers, so llama.cpp's "more bits" layers (l < 4/8, l >= 7*4/8 or (l - 4/8) % 3 == 2)
// are 2 and 3; 8 experts, so its 8-expert rules give attn_k/attn_v Q8_0 and attn_output Q5_K.
TEST_F(SplitAndMixed, Q4_K_MMixHasLlamaCppsTypesPerTensor) {
  const gguf::File f = gguf::File::open(mixed_);
  auto type_of = [&](const std::string& name) {
    const gguf::TensorInfo* t = f.find_tensor(name);
    EXPECT_NE(t, nullptr) << name;
    return t ? ggml_type_name(t->type) : std::string("missing");
  };
  EXPECT_EQ(type_of("token_embd.weight"), "Q4_K");
  EXPECT_EQ(type_of("output.weight"), "Q6_K");
  EXPECT_EQ(type_of("output_norm.weight"), "F32");
  for (int l = 0; l < 4; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    const bool more = l == 2 || l == 3;
    EXPECT_EQ(type_of(b + "attn_norm.weight"), "F32");
    EXPECT_EQ(type_of(b + "attn_q.weight"), "Q4_K");
    EXPECT_EQ(type_of(b + "attn_k.weight"), "Q8_0");
    EXPECT_EQ(type_of(b + "attn_v.weight"), "Q8_0");
    EXPECT_EQ(type_of(b + "attn_output.weight"), "Q5_K");
    EXPECT_EQ(type_of(b + "ffn_gate_inp.weight"), "F32");
    EXPECT_EQ(type_of(b + "ffn_gate_exps.weight"), "Q4_K");
    EXPECT_EQ(type_of(b + "ffn_up_exps.weight"), "Q4_K");
    EXPECT_EQ(type_of(b + "ffn_down_exps.weight"), more ? "Q6_K" : "Q4_K") << l;
  }
  EXPECT_EQ(f.get_uint("general.file_type"), 15u);  // LLAMA_FTYPE_MOSTLY_Q4_K_M
  EXPECT_EQ(f.get_string("general.architecture"), "qwen3moe");
  EXPECT_EQ(report_.requantized, 0);
}

TEST(QuantMixRules, FollowLlamaCppForOtherExpertCounts) {
  TensorTypeQuery q;
  q.n_layers = 48;
  q.n_experts = 128;
  q.ne = {2048, 512};
  q.name = "blk.0.attn_v.weight";
  EXPECT_EQ(choose_quant_type(q, QuantType::Q4_K, QuantMix::Q4_K_M), QuantType::Q6_K);
  q.name = "blk.7.attn_v.weight";  // 48/8 = 6 <= 7 < 42, (7 - 6) % 3 != 2
  EXPECT_EQ(choose_quant_type(q, QuantType::Q4_K, QuantMix::Q4_K_M), QuantType::Q4_K);
  q.name = "blk.8.ffn_down_exps.weight";  // (8 - 6) % 3 == 2
  EXPECT_EQ(choose_quant_type(q, QuantType::Q4_K, QuantMix::Q5_K_M), QuantType::Q6_K);
  q.name = "blk.8.attn_output.weight";
  EXPECT_EQ(choose_quant_type(q, QuantType::Q5_K, QuantMix::Q5_K_M), QuantType::Q5_K);
  q.name = "blk.8.ffn_gate_inp.weight";
  EXPECT_EQ(choose_quant_type(q, QuantType::Q4_K, QuantMix::Q4_K_M), QuantType::F32);
  q.name = "blk.8.attn_q.weight";
  q.ne = {2048 + 32, 512};  // not whole super-blocks: Q8_0
  EXPECT_EQ(choose_quant_type(q, QuantType::Q4_K, QuantMix::None), QuantType::Q8_0);
  q.ne = {100, 512};
  EXPECT_EQ(choose_quant_type(q, QuantType::Q4_K, QuantMix::None), QuantType::F16);
  q.name = "blk.8.attn_norm.weight";
  q.ne = {2048};
  EXPECT_EQ(choose_quant_type(q, QuantType::Q4_K, QuantMix::Q4_K_M), QuantType::F32);
}

// The mixed file loads and runs; against the F32 model it stays a close approximation (a loose
// sanity bound: Q4_K weights carry ~7 % relative RMS error each, Q8_K activations more, through
// 4 layers of top-2 routing), and a wrong layout would give unrelated logits (error ~1).
TEST_F(SplitAndMixed, MixedFileRunsOnTheCpuEngine) {
  const ModelWeights mixed = load_model(mixed_);
  const ModelWeights f32 = load_model(f32_);
  EXPECT_EQ(mixed.layers[2].down_exps.type, QuantType::Q6_K);
  EXPECT_EQ(mixed.layers[1].down_exps.type, QuantType::Q4_K);
  const std::vector<float> a = logits_of(mixed, kTokens);
  const std::vector<float> b = logits_of(f32, kTokens);
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * double(a[i] - b[i]);
    den += b[i] * double(b[i]);
  }
  const double rel = std::sqrt(num / den);
  std::printf("[ Q4_K_M vs F32 ] relative RMS logit difference %.3g\n", rel);
  EXPECT_LT(rel, 0.3);  // measured 0.11
}

TEST_F(SplitAndMixed, SplitSetLoadsFromItsFirstPartAndRunsLikeTheSingleFile) {
  const std::vector<std::string> parts = write_split(mixed_, dir_->file("m"), 3);
  const ModelWeights one = load_model(mixed_);
  const ModelWeights split = load_model(parts[0]);
  ASSERT_EQ(one.tensor_list().size(), split.tensor_list().size());
  for (size_t i = 0; i < one.tensor_list().size(); ++i) {
    const TensorView* a = one.tensor_list()[i];
    const TensorView* b = split.tensor_list()[i];
    ASSERT_EQ(a->type, b->type) << a->name;
    ASSERT_EQ(std::memcmp(a->data, b->data, static_cast<size_t>(a->nbytes())), 0) << a->name;
  }
  const std::vector<float> x = logits_of(one, kTokens);
  const std::vector<float> y = logits_of(split, kTokens);
  EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)), 0);
  const gguf::File f = gguf::File::open_split(parts[0]);
  EXPECT_EQ(f.part_paths(), parts);
  EXPECT_EQ(f.find_tensor("output.weight")->part, 2u);
  // The CLI takes the first part like any model.
  const auto r = test::run_ktune({"info", "--model", parts[0]});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(SplitAndMixed, SplitErrorsNameTheFileAtFault) {
  {
    const auto parts = write_split(mixed_, dir_->file("missing"), 3);
    fs::remove(parts[2]);
    const std::string e = error_of([&] { load_model(parts[0]); });
    EXPECT_NE(e.find(parts[2]), std::string::npos) << e;
    EXPECT_NE(e.find("part 3 of 3"), std::string::npos) << e;
    EXPECT_NE(e.find("is missing"), std::string::npos) << e;
  }
  {
    SplitEdits ed;
    ed.no_in_part = 1;
    const auto parts = write_split(mixed_, dir_->file("badno"), 3, ed);
    const std::string e = error_of([&] { load_model(parts[0]); });
    EXPECT_NE(e.find(parts[1]), std::string::npos) << e;
    EXPECT_NE(e.find("expected split.no 1 of split.count 3, found split.no 2"),
              std::string::npos)
        << e;
  }
  {
    SplitEdits ed;
    ed.count_in_part = 2;
    const auto parts = write_split(mixed_, dir_->file("badcount"), 3, ed);
    const std::string e = error_of([&] { load_model(parts[0]); });
    EXPECT_NE(e.find(parts[2]), std::string::npos) << e;
    EXPECT_NE(e.find("of split.count 4"), std::string::npos) << e;
  }
  {
    SplitEdits ed;
    ed.tensors_count_delta = 1;
    const auto parts = write_split(mixed_, dir_->file("badtotal"), 2, ed);
    const std::string e = error_of([&] { load_model(parts[0]); });
    EXPECT_NE(e.find("split.tensors.count says"), std::string::npos) << e;
  }
  {
    SplitEdits ed;
    ed.duplicate_first_tensor_in_last_part = true;
    ed.tensors_count_delta = 1;
    const auto parts = write_split(mixed_, dir_->file("dup"), 2, ed);
    const std::string e = error_of([&] { load_model(parts[0]); });
    EXPECT_NE(e.find("token_embd.weight' is also in an earlier part"), std::string::npos) << e;
  }
  {
    const auto parts = write_split(mixed_, dir_->file("second"), 2);
    const std::string e = error_of([&] { load_model(parts[1]); });
    EXPECT_NE(e.find("is part 2 of a model split into 2 files"), std::string::npos) << e;
    EXPECT_NE(e.find("-00001-of-00002.gguf"), std::string::npos) << e;
    // Renamed away from the gguf-split pattern: the other parts cannot be found.
    const std::string renamed = dir_->file("renamed.gguf");
    fs::rename(parts[0], renamed);
    const std::string e2 = error_of([&] { load_model(renamed); });
    EXPECT_NE(e2.find("does not end in -00001-of-00002.gguf"), std::string::npos) << e2;
  }
}

// A file with a tensor type ktune cannot compute with (IQ2_XXS here): the loader names the
// tensor and the type; `ktune quantize` does too.
TEST_F(SplitAndMixed, UnsupportedTensorTypeIsACleanErrorNamingIt) {
  const gguf::File src = gguf::File::open(mixed_);
  gguf::Writer w;
  for (const auto& kv : src.metadata()) w.set(kv.first, kv.second);
  const std::string victim = "blk.1.ffn_up_exps.weight";
  for (const gguf::TensorInfo& t : src.tensors()) {
    w.add_tensor(t.name, t.ne, t.name == victim ? static_cast<QuantType>(16) : t.quant());
  }
  const std::string path = dir_->file("iq2.gguf");
  w.write(path, [&](size_t i, const gguf::TensorInfo& info, gguf::ByteSink& out) {
    const std::vector<uint8_t> zeros(info.nbytes);
    out.write(src.tensors()[i].name == victim ? zeros.data() : src.tensors()[i].data, info.nbytes);
  });
  const std::string e = error_of([&] { load_model(path); });
  EXPECT_NE(e.find("tensor blk.1.ffn_up_exps.weight has type IQ2_XXS"), std::string::npos) << e;
  QuantizeOptions q;
  q.type = QuantType::Q8_0;
  const std::string e2 = error_of([&] { quantize_gguf(path, dir_->file("x.gguf"), q); });
  EXPECT_NE(e2.find("tensor blk.1.ffn_up_exps.weight has type IQ2_XXS"), std::string::npos)
      << e2;
  EXPECT_FALSE(fs::exists(dir_->file("x.gguf")));
}

// ktune quantize on the command line: from a split F32 set, a pure Q6_K file whose tensors are
// byte-identical to quantize_row's; usage errors exit 2.
TEST_F(SplitAndMixed, QuantizeCommand) {
  const auto parts = write_split(f32_, dir_->file("f32"), 2);
  const std::string out = dir_->file("q6.gguf");
  auto r = test::run_ktune({"quantize", parts[0], out, "--type", "q6_k", "--threads", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("Q6_K"), std::string::npos) << r.err;
  const gguf::File in = gguf::File::open_split(parts[0]);
  const gguf::File q6 = gguf::File::open(out);
  const gguf::TensorInfo* src = in.find_tensor("blk.2.ffn_down_exps.weight");
  const gguf::TensorInfo* dst = q6.find_tensor("blk.2.ffn_down_exps.weight");
  ASSERT_TRUE(src && dst);
  ASSERT_EQ(dst->quant(), QuantType::Q6_K);
  std::vector<uint8_t> want(dst->nbytes);
  const int64_t row = src->ne[0];
  for (int64_t r0 = 0; r0 < src->n_elements() / row; ++r0) {
    quantize_row(QuantType::Q6_K, reinterpret_cast<const float*>(src->data) + r0 * row,
                 want.data() + r0 * row_bytes(QuantType::Q6_K, row), row);
  }
  EXPECT_EQ(std::memcmp(want.data(), dst->data, want.size()), 0);
  EXPECT_EQ(q6.find("split.count"), nullptr);
  EXPECT_EQ(q6.get_uint("general.file_type"), 18u);

  r = test::run_ktune({"quantize", parts[0], out, "--type", "q3_k"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = test::run_ktune({"quantize", parts[0], out});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--mixed q4_k_m"), std::string::npos) << r.err;
  r = test::run_ktune({"quantize", parts[0], out, "--mixed", "q4_k_m", "--type", "q6_k"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = test::run_ktune({"quantize", "--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("q4_k_m"), std::string::npos);
}

}  // namespace
}  // namespace ktune
