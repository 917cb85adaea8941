// `ktune quantize`: GGUF in, GGUF out, each tensor converted row by row (dequantize to float,
// quantize to the chosen type) in chunks of rows spread over a thread pool, streamed into the
// GGUF writer so memory stays at a few chunks whatever the model's size.
#include "ktune/engine/quantize.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/model.h"
#include "ktune/engine/thread_pool.h"

namespace ktune {
namespace {

constexpr size_t kChunkBytes = size_t{4} << 20;  // output bytes converted per parallel step

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// Layer index of "blk.N.*", or -1.
int64_t layer_of(const std::string& name) {
  if (name.rfind("blk.", 0) != 0) return -1;
  int64_t v = 0;
  size_t i = 4;
  if (i >= name.size() || !std::isdigit(static_cast<unsigned char>(name[i]))) return -1;
  while (i < name.size() && std::isdigit(static_cast<unsigned char>(name[i]))) {
    v = v * 10 + (name[i] - '0');
    if (v > (int64_t{1} << 40)) return -1;
    ++i;
  }
  return v;
}

// llama.cpp's "use more bits" layers: the first and last eighth, and every third one between.
bool more_bits(int64_t layer, int64_t n_layers) {
  return layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2;
}

QuantType fit_row(QuantType t, int64_t row_len) {
  if (row_len % block_elems(t) == 0) return t;
  return row_len % 32 == 0 ? QuantType::Q8_0 : QuantType::F16;
}

}  // namespace

std::optional<QuantMix> parse_quant_mix(std::string_view name) {
  std::string s;
  for (char c : name) {
    if (!std::isspace(static_cast<unsigned char>(c))) {
      s += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
  }
  if (s == "q4_k_m") return QuantMix::Q4_K_M;
  if (s == "q5_k_m") return QuantMix::Q5_K_M;
  return std::nullopt;
}

const char* quant_mix_name(QuantMix mix) {
  switch (mix) {
    case QuantMix::Q4_K_M:
      return "Q4_K_M";
    case QuantMix::Q5_K_M:
      return "Q5_K_M";
    case QuantMix::None:
      break;
  }
  return "none";
}

QuantType quant_mix_base(QuantMix mix) {
  switch (mix) {
    case QuantMix::Q4_K_M:
      return QuantType::Q4_K;
    case QuantMix::Q5_K_M:
      return QuantType::Q5_K;
    case QuantMix::None:
      break;
  }
  return QuantType::Q8_0;
}

QuantType choose_quant_type(const TensorTypeQuery& q, QuantType base, QuantMix mix) {
  const std::string& n = q.name;
  // Norms and biases are vectors; the router is small and decides which experts run: llama.cpp
  // keeps both as they are, and so does ktune.
  int dims = static_cast<int>(q.ne.size());
  while (dims > 1 && q.ne[static_cast<size_t>(dims - 1)] == 1) --dims;
  if (dims <= 1 || contains(n, "ffn_gate_inp")) return q.source;
  if (q.ne.empty() || q.ne[0] <= 0) return q.source;
  QuantType t = base;
  if (mix != QuantMix::None) {
    const int64_t layer = layer_of(n);
    const bool layered = layer >= 0 && q.n_layers > 0 && layer < q.n_layers;
    if (n == "output.weight" || (q.tied_embeddings && n == "token_embd.weight")) {
      t = QuantType::Q6_K;
    } else if (contains(n, ".attn_v.")) {
      // 8-expert models (Mixtral-like) share attn_v among few heads: llama.cpp gives it Q8_0.
      if (q.n_experts == 8) {
        t = QuantType::Q8_0;
      } else if (layered && more_bits(layer, q.n_layers)) {
        t = QuantType::Q6_K;
      }
    } else if (contains(n, ".attn_k.") && q.n_experts == 8) {
      t = QuantType::Q8_0;
    } else if (contains(n, ".attn_output.") && q.n_experts == 8 && mix == QuantMix::Q4_K_M) {
      t = QuantType::Q5_K;
    } else if (contains(n, ".ffn_down") && layered && more_bits(layer, q.n_layers)) {
      t = QuantType::Q6_K;  // ffn_down, ffn_down_exps, ffn_down_shexp
    }
  }
  return fit_row(t, q.ne[0]);
}

QuantizeReport quantize_gguf(const std::string& in, const std::string& out,
                             const QuantizeOptions& opt, const QuantizeProgress& progress) {
  const gguf::File f = gguf::File::open_split(in);
  QuantType base = opt.type;
  if (opt.mix != QuantMix::None) base = quant_mix_base(opt.mix);
  if (!is_supported_quant(static_cast<uint32_t>(base)) || base == QuantType::Q8_K) {
    throw_usage("--type", std::string("cannot quantize to ") + quant_name(base),
                "use f32, f16, bf16, q8_0, q4_0, q4_k, q5_k or q6_k");
  }

  gguf::Writer w;
  for (const auto& kv : f.metadata()) {
    if (kv.first.rfind("split.", 0) == 0 || kv.first == "general.alignment") continue;
    w.set(kv.first, kv.second);
  }
  w.set_alignment(f.alignment());
  uint32_t file_type = llama_file_type(base);
  if (opt.mix == QuantMix::Q4_K_M) file_type = 15;  // LLAMA_FTYPE_MOSTLY_Q4_K_M
  if (opt.mix == QuantMix::Q5_K_M) file_type = 17;  // LLAMA_FTYPE_MOSTLY_Q5_K_M
  w.set("general.file_type", gguf::Value::u32(file_type));
  w.set("general.quantization_version", gguf::Value::u32(2));

  std::string arch;
  if (const gguf::Value* a = f.find("general.architecture");
      a != nullptr && a->type == gguf::ValueType::STRING) {
    arch = a->s;
  }
  TensorTypeQuery q;
  q.n_layers = static_cast<int64_t>(f.get_uint_or(arch + ".block_count", 0));
  q.n_experts = static_cast<int64_t>(f.get_uint_or(arch + ".expert_count", 0));
  q.tied_embeddings = f.find_tensor("output.weight") == nullptr;

  QuantizeReport report;
  std::vector<QuantType> targets;
  for (const gguf::TensorInfo& t : f.tensors()) {
    if (!is_supported_quant(t.type) || t.type == static_cast<uint32_t>(QuantType::Q8_K)) {
      throw Error(in,
                  "tensor " + t.name + " has type " + ggml_type_name(t.type) +
                      ", which ktune cannot read",
                  "quantize from a file whose tensors are F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K "
                  "or Q6_K (best: the F16/BF16 conversion of the original model)");
    }
    q.name = t.name;
    q.ne = t.ne;
    q.source = t.quant();
    const QuantType to = choose_quant_type(q, base, opt.mix);
    targets.push_back(to);
    w.add_tensor(t.name, t.ne, to);
    ++report.tensors;
    report.bytes_in += t.nbytes;
    report.tensors_by_type[quant_name(to)] += 1;
    const bool source_quantized = t.quant() != QuantType::F32 && t.quant() != QuantType::F16 &&
                                  t.quant() != QuantType::BF16;
    if (source_quantized && to != t.quant()) ++report.requantized;
  }
  report.bytes_out = w.total_bytes();

  ThreadPool pool(opt.threads, false);
  const std::vector<gguf::TensorInfo>& src = f.tensors();
  auto fill = [&](size_t index, const gguf::TensorInfo&, gguf::ByteSink& sink) {
    const gguf::TensorInfo& s = src[index];
    const QuantType to = targets[index];
    const int64_t row_len = s.ne.empty() ? 1 : s.ne[0];
    const int64_t rows = row_len > 0 ? s.n_elements() / row_len : 0;
    if (rows == 0) return;
    if (s.quant() == to) {  // same type: the bytes as they are
      for (uint64_t off = 0; off < s.nbytes; off += kChunkBytes) {
        sink.write(s.data + off, static_cast<size_t>(std::min<uint64_t>(kChunkBytes, s.nbytes - off)));
      }
      return;
    }
    const int64_t in_rb = row_bytes(s.quant(), row_len);
    const int64_t out_rb = row_bytes(to, row_len);
    const int64_t chunk_rows = std::max<int64_t>(1, static_cast<int64_t>(kChunkBytes) / out_rb);
    std::vector<uint8_t> buf(static_cast<size_t>(std::min(rows, chunk_rows) * out_rb));
    for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
      const int64_t r1 = std::min(rows, r0 + chunk_rows);
      pool.run([&](int ith, int nth) {
        std::vector<float> tmp(static_cast<size_t>(row_len));
        for (int64_t r = r0 + ith; r < r1; r += nth) {
          dequantize_row(s.quant(), s.data + r * in_rb, tmp.data(), row_len);
          quantize_row(to, tmp.data(), buf.data() + (r - r0) * out_rb, row_len);
        }
      });
      sink.write(buf.data(), static_cast<size_t>((r1 - r0) * out_rb));
    }
  };
  w.write(out, fill, progress);
  return report;
}

}  // namespace ktune
