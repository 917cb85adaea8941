// Writes the binary seeds of tests/fuzz/corpus (a compact valid qwen3moe GGUF and a few GGUF and
// safetensors variants) with ktune's own writers, so the seeds follow the formats as ktune reads
// them. Usage: ktune_fuzz_seeds <corpus folder>  (tools/fuzz.sh --seeds runs it).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "ktune/engine/gguf.h"
#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"

namespace {

using namespace ktune;

// The smallest shape ModelConfig::validate accepts with every tensor present: a few KB as F32.
ModelConfig micro() {
  ModelConfig c;
  c.arch = "qwen3moe";
  c.name = "micro";
  c.n_layers = 1;
  c.hidden = 8;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.n_experts = 4;
  c.n_experts_used = 2;
  c.expert_ffn = 8;
  c.dense_ffn = 16;
  c.vocab = 16;
  c.context_length = 64;
  return c;
}

void write_model(const std::string& path, const ModelConfig& c, bool tied) {
  gguf::Writer w;
  set_gguf_model_metadata(w, c, QuantType::F32);
  for (const TensorSpec& s : model_tensor_specs(c)) {
    if (tied && s.base == "output") continue;
    w.add_tensor(s.name, std::vector<int64_t>(s.ne.begin(), s.ne.begin() + s.n_dims),
                 QuantType::F32);
  }
  w.write(path, [](size_t index, const gguf::TensorInfo& info, gguf::ByteSink& out) {
    std::vector<float> v(info.nbytes / sizeof(float));
    for (size_t i = 0; i < v.size(); ++i) v[i] = 0.01f * float((i + index) % 17);
    out.write(v.data(), info.nbytes);
  });
}

// Every metadata type, nested arrays, a non-default alignment and two small tensors.
void write_kitchen_sink(const std::string& path) {
  gguf::Writer w;
  w.set_alignment(64);
  w.set("u8", gguf::Value::u8(7));
  w.set("i8", gguf::Value::i8(-7));
  w.set("u16", gguf::Value::u16(700));
  w.set("i16", gguf::Value::i16(-700));
  w.set("u32", gguf::Value::u32(70000));
  w.set("i32", gguf::Value::i32(-70000));
  w.set("u64", gguf::Value::u64(1ull << 40));
  w.set("i64", gguf::Value::i64(-(1ll << 40)));
  w.set("f32", gguf::Value::f32(1.5f));
  w.set("f64", gguf::Value::f64(-2.25));
  w.set("bool", gguf::Value::boolean(true));
  w.set("str", gguf::Value::string("qwen3moe"));
  w.set("arr.str", gguf::Value::make_array(gguf::ValueType::STRING,
                                           {gguf::Value::string("a"), gguf::Value::string("bc")}));
  w.set("arr.nested", gguf::Value::make_array(
                          gguf::ValueType::ARRAY,
                          {gguf::Value::make_array(gguf::ValueType::INT32,
                                                   {gguf::Value::i32(1), gguf::Value::i32(-2)})}));
  w.add_tensor("a.weight", {4, 2}, QuantType::F32);
  w.add_tensor("b.weight", {32, 1}, QuantType::F16);
  w.write(path, [](size_t, const gguf::TensorInfo& info, gguf::ByteSink& out) {
    std::vector<uint8_t> v(info.nbytes, 0x3c);
    out.write(v.data(), v.size());
  });
}

// safetensors: u64 header length, JSON header, data.
void write_safetensors(const std::string& path, const std::string& header,
                       const std::vector<uint8_t>& data) {
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = header.size();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(n >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(header.data(), std::streamsize(header.size()));
  out.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus folder>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  write_model(dir + "/fuzz_gguf/micro-qwen3moe-f32.gguf", micro(), false);
  write_model(dir + "/fuzz_gguf/micro-qwen3moe-tied.gguf", micro(), true);
  write_kitchen_sink(dir + "/fuzz_gguf/kitchen-sink.gguf");

  std::vector<uint8_t> data(64);
  for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t(i * 7);
  write_safetensors(dir + "/fuzz_safetensors/f32-f16-bf16.safetensors",
                    R"({"__metadata__":{"format":"pt"},)"
                    R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                    R"("b":{"dtype":"F16","shape":[2,2],"data_offsets":[16,24]},)"
                    R"("c":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},)"
                    R"("d":{"dtype":"I64","shape":[2],"data_offsets":[32,48]},)"
                    R"("e":{"dtype":"F64","shape":[2],"data_offsets":[48,64]}})",
                    data);
  write_safetensors(dir + "/fuzz_safetensors/scalar-and-empty.safetensors",
                    R"({"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
                    R"("z":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]}})",
                    std::vector<uint8_t>(4, 0));
  write_safetensors(dir + "/fuzz_safetensors/header-only.safetensors", "{}", {});
  return 0;
}
