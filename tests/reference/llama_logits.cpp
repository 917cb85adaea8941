// llama_logits: load a GGUF model with llama.cpp (public llama.h API only), prefill a token
// sequence with logits for every position, optionally decode more tokens one at a time
// (teacher-forced), and print the logits as one JSON document shaped like
// `ktune logits --json`:  {"prefill": [[...], ...], "decode": [[...], ...]}
//
// With --compare FILE (a `ktune logits --json` document) it prints, instead, a table of
// max|diff| / max|logit| per position and the argmax of each side, and exits 1 when any
// position's relative difference exceeds --tol.
//
// Built by tests/reference/compare_with_llama_cpp.sh against a llama.cpp checkout the user
// provides; not part of ktune's build or CI.
//
// Numerics chosen to make the comparison about the model, not about llama.cpp's defaults:
// the KV cache is F32 (llama.cpp's default is F16) and flash attention is off; pass
// --kv f16 to see llama.cpp's default cache.
#include "llama.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using Rows = std::vector<std::vector<float>>;

std::vector<llama_token> parse_tokens(const std::string& s) {
  std::vector<llama_token> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(static_cast<llama_token>(std::stol(item)));
  }
  return out;
}

// Minimal reader for {"key": [[numbers...], ...], ...}: the only JSON `ktune logits --json` writes.
struct JsonReader {
  const std::string& s;
  size_t i = 0;
  void ws() {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  }
  void expect(char c) {
    ws();
    if (i >= s.size() || s[i] != c) {
      throw std::runtime_error(std::string("JSON: expected '") + c + "' at offset " +
                               std::to_string(i));
    }
    ++i;
  }
  std::string str() {
    expect('"');
    const size_t b = i;
    while (i < s.size() && s[i] != '"') ++i;
    std::string out = s.substr(b, i - b);
    ++i;
    return out;
  }
  std::vector<float> numbers() {
    std::vector<float> v;
    expect('[');
    ws();
    if (s[i] == ']') { ++i; return v; }
    for (;;) {
      ws();
      char* end = nullptr;
      v.push_back(std::strtof(s.c_str() + i, &end));
      if (end == s.c_str() + i) throw std::runtime_error("JSON: bad number");
      i = static_cast<size_t>(end - s.c_str());
      ws();
      if (s[i] == ',') { ++i; continue; }
      expect(']');
      return v;
    }
  }
  Rows rows() {
    Rows r;
    expect('[');
    ws();
    if (s[i] == ']') { ++i; return r; }
    for (;;) {
      r.push_back(numbers());
      ws();
      if (s[i] == ',') { ++i; continue; }
      expect(']');
      return r;
    }
  }
};

void read_ktune_json(const std::string& path, Rows* prefill, Rows* decode) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream buf;
  buf << f.rdbuf();
  const std::string text = buf.str();
  JsonReader r{text};
  r.expect('{');
  for (;;) {
    const std::string key = r.str();
    r.expect(':');
    Rows rows = r.rows();
    if (key == "prefill") *prefill = std::move(rows);
    if (key == "decode") *decode = std::move(rows);
    r.ws();
    if (r.s[r.i] == ',') { ++r.i; continue; }
    r.expect('}');
    return;
  }
}

void print_rows_json(const Rows& rows) {
  std::printf("[");
  for (size_t p = 0; p < rows.size(); ++p) {
    std::printf("%s[", p ? "," : "");
    for (size_t k = 0; k < rows[p].size(); ++k) std::printf("%s%.9g", k ? "," : "", rows[p][k]);
    std::printf("]");
  }
  std::printf("]");
}

size_t argmax(const std::vector<float>& v) {
  return static_cast<size_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// Prints one table row per position; returns the largest relative difference.
double compare_rows(const char* label, const Rows& ours, const Rows& theirs) {
  double worst = 0.0;
  if (ours.size() != theirs.size()) {
    std::printf("%s: llama.cpp has %zu rows, ktune %zu\n", label, ours.size(), theirs.size());
    return INFINITY;
  }
  for (size_t p = 0; p < ours.size(); ++p) {
    if (ours[p].size() != theirs[p].size()) {
      std::printf("%s %zu: vocab differs (llama.cpp %zu, ktune %zu)\n", label, p, ours[p].size(),
                  theirs[p].size());
      return INFINITY;
    }
    double max_diff = 0.0, max_abs = 0.0;
    for (size_t k = 0; k < ours[p].size(); ++k) {
      max_diff = std::max(max_diff, std::fabs(double(ours[p][k]) - double(theirs[p][k])));
      max_abs = std::max(max_abs, std::fabs(double(theirs[p][k])));
    }
    const double rel = max_abs > 0 ? max_diff / max_abs : max_diff;
    worst = std::max(worst, rel);
    std::printf("%-8s %4zu  %12.4e  %12.4e  %12.4e  %8zu  %8zu\n", label, p, max_diff, max_abs, rel,
                argmax(ours[p]), argmax(theirs[p]));
  }
  return worst;
}

void usage() {
  std::fprintf(stderr,
               "usage: llama_logits MODEL.gguf TOKENS [--then TOKENS] [--threads N] [--kv f32|f16]\n"
               "                    [--no-repack] [--compare KTUNE.json] [--tol REL]\n"
               "  TOKENS: comma-separated token ids, e.g. 5,77,300\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) { usage(); return 2; }
  const std::string model_path = argv[1];
  const std::vector<llama_token> prompt = parse_tokens(argv[2]);
  std::vector<llama_token> then;
  int threads = 0;
  ggml_type kv_type = GGML_TYPE_F32;
  std::string compare_path;
  double tol = -1.0;
  bool repack = true;
  for (int a = 3; a < argc; ++a) {
    const std::string arg = argv[a];
    if (arg == "--no-repack") { repack = false; continue; }
    const char* val = a + 1 < argc ? argv[a + 1] : nullptr;
    if (!val) { usage(); return 2; }
    if (arg == "--then") then = parse_tokens(val);
    else if (arg == "--threads") threads = std::atoi(val);
    else if (arg == "--kv") kv_type = std::string(val) == "f16" ? GGML_TYPE_F16 : GGML_TYPE_F32;
    else if (arg == "--compare") compare_path = val;
    else if (arg == "--tol") tol = std::atof(val);
    else { usage(); return 2; }
    ++a;
  }
  if (prompt.empty()) { usage(); return 2; }

  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = 0;
  mp.use_extra_bufts = repack;  // false: no CPU_REPACK (q4_0_8x8 etc.), plain ggml-cpu kernels
  llama_model* model = llama_model_load_from_file(model_path.c_str(), mp);
  if (!model) {
    std::fprintf(stderr, "llama_logits: llama.cpp failed to load %s\n", model_path.c_str());
    return 3;
  }
  const llama_vocab* vocab = llama_model_get_vocab(model);
  const int n_vocab = llama_vocab_n_tokens(vocab);
  if (n_vocab <= 0) {
    std::fprintf(stderr, "llama_logits: the model has no vocabulary size (n_vocab = %d)\n", n_vocab);
    return 3;
  }
  for (llama_token t : prompt) {
    if (t < 0 || t >= n_vocab) { std::fprintf(stderr, "token %d out of range\n", t); return 2; }
  }

  const int n_prompt = static_cast<int>(prompt.size());
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = static_cast<uint32_t>(std::max(256, n_prompt + static_cast<int>(then.size()) + 1));
  cp.n_batch = static_cast<uint32_t>(std::max(n_prompt, 1));
  cp.n_ubatch = cp.n_batch;
  cp.n_seq_max = 1;
  cp.type_k = kv_type;
  cp.type_v = kv_type;
  cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
  if (threads > 0) { cp.n_threads = threads; cp.n_threads_batch = threads; }
  llama_context* ctx = llama_init_from_model(model, cp);
  if (!ctx) {
    std::fprintf(stderr, "llama_logits: llama_init_from_model failed\n");
    return 3;
  }

  Rows prefill, decode;
  {
    llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; ++i) {
      batch.token[i] = prompt[i];
      batch.pos[i] = i;
      batch.n_seq_id[i] = 1;
      batch.seq_id[i][0] = 0;
      batch.logits[i] = 1;  // logits for every position
    }
    batch.n_tokens = n_prompt;
    if (llama_decode(ctx, batch) != 0) {
      std::fprintf(stderr, "llama_logits: llama_decode failed on the prompt\n");
      return 4;
    }
    for (int i = 0; i < n_prompt; ++i) {
      const float* l = llama_get_logits_ith(ctx, i);
      prefill.emplace_back(l, l + n_vocab);
    }
    llama_batch_free(batch);
  }
  for (size_t d = 0; d < then.size(); ++d) {
    llama_batch batch = llama_batch_init(1, 0, 1);
    batch.token[0] = then[d];
    batch.pos[0] = n_prompt + static_cast<int>(d);
    batch.n_seq_id[0] = 1;
    batch.seq_id[0][0] = 0;
    batch.logits[0] = 1;
    batch.n_tokens = 1;
    if (llama_decode(ctx, batch) != 0) {
      std::fprintf(stderr, "llama_logits: llama_decode failed at decode step %zu\n", d);
      return 4;
    }
    const float* l = llama_get_logits_ith(ctx, 0);
    decode.emplace_back(l, l + n_vocab);
    llama_batch_free(batch);
  }
  llama_free(ctx);
  llama_model_free(model);
  llama_backend_free();

  if (compare_path.empty()) {
    std::printf("{\"prefill\":");
    print_rows_json(prefill);
    std::printf(",\"decode\":");
    print_rows_json(decode);
    std::printf("}\n");
    return 0;
  }

  Rows k_prefill, k_decode;
  try {
    read_ktune_json(compare_path, &k_prefill, &k_decode);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama_logits: %s\n", e.what());
    return 2;
  }
  std::printf("%-8s %4s  %12s  %12s  %12s  %8s  %8s\n", "phase", "pos", "max|diff|", "max|logit|",
              "rel", "top(llm)", "top(kt)");
  double worst = compare_rows("prefill", prefill, k_prefill);
  worst = std::max(worst, compare_rows("decode", decode, k_decode));
  std::printf("worst rel = %.4e\n", worst);
  return (tol >= 0 && !(worst <= tol)) ? 1 : 0;
}
