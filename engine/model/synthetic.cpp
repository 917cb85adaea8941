// Deterministic random-weight models of a preset's shape, in memory or streamed to a GGUF file.
//
// Statistics (design §8: a collapsed router makes every speed number false):
//   * every weight is zero-mean, drawn uniformly from [-a, a] with a = sqrt(3) * std, which has
//     the requested std and is cheap (four 16-bit values per 64-bit random number): building
//     qwen3-30b-a3b (30.5e9 weights) is bound by quantization, not by the generator;
//   * matrices (attention, experts, router, output head): std = 1/sqrt(fan_in), fan_in = ne[0],
//     so every matrix-vector product of an RMS-normalized input has outputs of std ~1: states
//     stay bounded through all layers and router logits have std ~1; attn_output alone is
//     scaled by kAttnOutputGain (see "Depth");
//   * token embeddings: std 1, so different tokens start from unrelated states and therefore
//     pick different experts (routing is near-uniform without skew);
//   * norm weights: exactly 1, except attn_q_norm/attn_k_norm = kQkNormWeight (see "Depth").
//
// Depth. Attention passes a component that all tokens share at gain 1 (its weights sum to 1)
// while it averages token-specific components down, so with full-scale random weights the
// shared part of the residual stream grows geometrically with depth and routing collapses:
// measured with the CPU engine on qwen3-30b-a3b (Q4_0, 64 prompt tokens), layer 0 used 122 of
// 128 experts but layer 24 only 32, every token picking the same top expert. Two changes stop
// the feedback: attn_output's std is scaled by kAttnOutputGain = 0.2 (attention adds little to
// the residual), and q/k norm weights of 2 make attention peaked (it passes one token's state
// instead of a context average). Measured the same way with these values: 123-126 of 128 experts
// used at every depth of a 94-layer, 4096-wide qwen3-235b-a22b-like stack.
//
// Router skew (--router-skew zipf:S). Hidden dimension 0 becomes a constant "bias channel":
//   * token_embd puts kBiasChannel in dimension 0 of every token;
//   * row 0 of attn_output and of every expert's ffn_down matrix is zero, so no layer ever
//     writes dimension 0 and the residual stream keeps kBiasChannel there;
//   * so after ffn_norm, dimension 0 holds kBiasChannel / rms(x) for every token, and the router
//     weight [expert e][dim 0] multiplies it into a per-expert logit offset. We set that weight
//     to  beta * log(zipf(rank(e))) / E[normalized dim 0 at this layer],
//     where rank(e) is e's place in a per-layer random permutation, zipf(r) = r^-S, and beta
//     converts the Gaussian logit noise (std ~1) into the scale of a Gumbel distribution, for
//     which "argmax of offset + noise" picks expert e with probability proportional to
//     exp(offset/beta) = zipf(rank(e)). Top-k selection saturates the most popular experts, so
//     the realised counts follow the Zipf law only approximately; measure them (router
//     statistics) rather than assume them. E[rms(x)] grows with depth as each layer adds its
//     output to the residual; the estimate below (kSiluSquare, kAttentionGrowth) is an
//     approximation.
//   Without skew, dimension 0 is an ordinary dimension.
//
// deepseek2 (MLA, shared experts, dense leading layers). The same recipe, mapped onto its
// tensors: queries are scaled by kQkNormWeight through attn_q_a_norm (or attn_q's std when
// queries are not compressed) and the latent through attn_kv_a_norm, so attention is as peaked as
// above; since the latent also makes the values, attn_output's gain is divided by the same
// factor. Shared experts and dense FFNs are ordinary matrices (std 1/sqrt(fan_in)). The expert
// selection bias (exp_probs_b) is small noise (kScoreBiasStd): non-zero, so an engine that
// ignores it or lets it into the weights differs, but far below the spread of sigmoid scores
// (~0.2), so routing stays near-uniform. Under skew, the rows of ffn_down_shexp and ffn_down
// that write dimension 0 are zero too, and the growth estimate counts the shared expert and the
// dense layers.
#include "ktune/engine/synthetic.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>

#include "ktune/engine/error.h"
#include "ktune/engine/interrupt.h"

namespace ktune {
namespace {

constexpr float kBiasChannel = 1.0f;
// sqrt(6)/pi = 0.78: std of a standard Gumbel distribution is pi/sqrt(6), so Gaussian noise of
// std 1 behaves roughly like Gumbel noise of this scale. Calibrated down by 0.8: with 0.78,
// zipf:1.1 on qwen3-30b-a3b (CPU engine, 256 prompt tokens) gave fitted exponents of 1.30-1.39
// over the top half of the experts at layers 0, 12, 24, 36 and 47; with the factor, zipf:1.1
// gives 1.10-1.16 and zipf:0.6 gives 0.64-0.73 at those layers.
constexpr double kGumbelBeta = 0.7797 * 0.8;
// See "Depth" above: attn_output's std is scaled by this gain, q/k norm weights are this value.
constexpr float kAttnOutputGain = 0.2f;
constexpr float kQkNormWeight = 2.0f;
// Expected growth of the residual stream's mean square per layer: E[silu(g)^2] = 0.356 for
// g ~ N(0,1) times sum(p^2) of the top-k routing weights (~1.3/k), plus attention's share
// (peaked attention passes about one token's v, of mean square 1, through attn_output's gain).
constexpr double kSiluSquare = 0.356;
constexpr double kAttentionGrowth = double{kAttnOutputGain} * kAttnOutputGain;
constexpr float kScoreBiasStd = 0.01f;

// Expected growth of the residual's mean square from the FFN of deepseek2 layer l: SiLU's
// E[silu(g)^2] times the sum of squared routing weights (normalized top-k: ~1.3/k, scaled; plain
// softmax top-k: ~k (4/E)^2), plus one for the shared experts; a dense layer adds one.
double deepseek2_ffn_growth(const ModelConfig& c, int64_t l) {
  if (c.is_dense_layer(l)) return kSiluSquare;
  const double k = static_cast<double>(c.n_experts_used);
  const double e = static_cast<double>(c.n_experts);
  const double s = c.expert_weights_scale;
  const double routed = c.norm_topk_prob ? s * s * 1.3 / k : s * s * k * (4.0 / e) * (4.0 / e);
  return kSiluSquare * (routed + (c.n_shared_experts > 0 ? 1.0 : 0.0));
}

uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

uint64_t hash_name(uint64_t seed, const std::string& name) {
  uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a, then mixed with the seed
  for (unsigned char ch : name) {
    h ^= ch;
    h *= 0x100000001B3ull;
  }
  return mix64(mix64(seed + kGolden) ^ h);
}

// n values uniform in [-a, a] (zero mean, std a/sqrt(3)) from the row's own random stream:
// wyrand (one 64x64->128-bit multiply per 64 random bits), four 16-bit values per draw.
void fill_uniform(uint64_t row_seed, float a, float* out, int64_t n) {
  uint64_t state = mix64(row_seed);
  const float scale = a / 32768.0f;
  auto draw = [&state] {
    state += 0xA0761D6478BD642Full;
    const __uint128_t t =
        static_cast<__uint128_t>(state) * static_cast<__uint128_t>(state ^ 0xE7037ED1A0B428DBull);
    return static_cast<uint64_t>(t >> 64) ^ static_cast<uint64_t>(t);
  };
  // (u - 32767.5) is symmetric around 0 over u in [0, 65535]: the mean is exactly zero. The
  // int32 detour keeps the conversion a single instruction (uint64 -> float is not).
  auto value = [scale](uint64_t bits) {
    return (static_cast<float>(static_cast<int32_t>(bits & 0xFFFF)) - 32767.5f) * scale;
  };
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const uint64_t r = draw();
    out[i] = value(r);
    out[i + 1] = value(r >> 16);
    out[i + 2] = value(r >> 32);
    out[i + 3] = value(r >> 48);
  }
  if (i < n) {
    uint64_t r = draw();
    for (; i < n; ++i, r >>= 16) out[i] = value(r);
  }
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string preset_list() {
  std::string s;
  for (const std::string& n : preset_names()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

int thread_count() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(std::min(n, 256u));
}

// Runs fn(item) for item in [0, n) on up to thread_count() threads; rethrows the first error.
// After Ctrl-C / SIGTERM (interrupt.h) it starts no new item and returns early: the caller
// checks interrupted() before using the results.
template <class F>
void parallel_items(int64_t n, const F& fn) {
  const int threads = static_cast<int>(std::min<int64_t>(thread_count(), n));
  if (threads <= 1) {
    for (int64_t i = 0; i < n && !interrupted(); ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&] {
    try {
      for (int64_t i = next++; i < n && !interrupted(); i = next++) fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next = n;
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    // Items are independent: when the system refuses a thread (process or address-space
    // limits), the threads already started (and this one) do the rest.
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error&) {
      break;
    }
  }
  worker();
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace

QuantType synthetic_row_type(QuantType wanted, int64_t row_len) {
  if (row_len % block_elems(wanted) == 0) return wanted;
  return row_len % block_elems(QuantType::Q8_0) == 0 ? QuantType::Q8_0 : QuantType::F16;
}

double parse_router_skew(const std::string& text, const std::string& where) {
  const std::string t = lower(text);
  const std::string fix = "use zipf:S with S >= 0 (e.g. zipf:1.1), or none";
  if (t.empty() || t == "none") return 0.0;
  if (t.rfind("zipf:", 0) != 0) throw_usage(where, "unknown router skew '" + text + "'", fix);
  const std::string num = t.substr(5);
  size_t used = 0;
  double s = 0.0;
  try {
    s = std::stod(num, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (num.empty() || used != num.size() || !std::isfinite(s) || s < 0.0 || s > 100.0) {
    throw_usage(where, "bad Zipf exponent '" + num + "' in router skew '" + text + "'", fix);
  }
  return s;
}

void set_synth_quant(SynthOptions& opt, const std::string& text, const std::string& where) {
  if (const std::optional<QuantMix> mix = parse_quant_mix(text)) {
    opt.mix = *mix;
    opt.quant = quant_mix_base(*mix);
    return;
  }
  if (!parse_quant_name(text)) {
    throw_usage(where, "unknown quant '" + text + "'",
                "use f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k, or a mix: q4_k_m, q5_k_m");
  }
  opt.mix = QuantMix::None;
  opt.quant = parse_quant_or_throw(text, where);
}

std::string synth_quant_label(const SynthOptions& opt) {
  return lower(opt.mix != QuantMix::None ? quant_mix_name(opt.mix) : quant_name(opt.quant));
}

SynthOptions parse_synth_spec(const std::string& spec) {
  const std::string fix = "use synth:PRESET[:QUANT], presets: " + preset_list() +
                          "; quant: f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k, q4_k_m, q5_k_m";
  if (spec.rfind("synth:", 0) != 0) throw_usage(spec, "not a synthetic model spec", fix);
  const std::string rest = spec.substr(6);
  const size_t colon = rest.find(':');
  const std::string preset = rest.substr(0, colon);
  if (preset.empty()) throw_usage(spec, "no preset named", fix);
  const ModelConfig* cfg = find_preset(preset);
  if (cfg == nullptr) {
    throw_usage(spec, "unknown preset '" + preset + "'", "presets: " + preset_list());
  }
  SynthOptions opt;
  opt.preset = cfg->name;
  if (colon != std::string::npos) {
    const std::string quant = rest.substr(colon + 1);
    if (quant.find(':') != std::string::npos) throw_usage(spec, "too many ':' fields", fix);
    set_synth_quant(opt, quant, spec);
  }
  return opt;
}

SyntheticGenerator::SyntheticGenerator(const SynthOptions& opt) : opt_(opt) {
  const ModelConfig* preset = opt.shape ? &*opt.shape : find_preset(opt.preset);
  if (preset == nullptr) {
    throw_usage(opt.preset, "unknown preset", "presets: " + preset_list());
  }
  if (opt.shape) opt.shape->validate("synthetic model " + opt.preset);
  if (!is_supported_quant(static_cast<uint32_t>(opt.quant))) {
    throw_usage(opt.preset, "unsupported quant type for a synthetic model",
                "use f32, f16, bf16, q8_0, q4_0, q4_k, q5_k or q6_k");
  }
  if (!(opt.zipf_s >= 0.0) || !std::isfinite(opt.zipf_s)) {
    throw_usage("--router-skew", "the Zipf exponent must be finite and >= 0", "e.g. zipf:1.1");
  }
  cfg_ = *preset;
  opt_.preset = cfg_.name;
  specs_ = model_tensor_specs(cfg_);
  // A mix: the types `ktune quantize --mixed` would give this model's tensors.
  TensorTypeQuery mixq;
  mixq.n_layers = cfg_.n_layers;
  mixq.n_experts = cfg_.n_experts;
  mixq.tied_embeddings = true;
  for (const TensorSpec& s : specs_) {
    if (s.base == "output") mixq.tied_embeddings = false;
  }
  for (const TensorSpec& s : specs_) {
    const bool f32 =
        s.role == TensorRole::Norm || s.role == TensorRole::Router || s.role == TensorRole::Bias;
    QuantType t = synthetic_row_type(opt.quant, s.ne[0]);
    if (opt.mix != QuantMix::None && !f32) {
      mixq.name = s.name;
      mixq.ne.assign(s.ne.begin(), s.ne.begin() + s.n_dims);
      mixq.source = QuantType::F32;
      t = choose_quant_type(mixq, opt.quant, opt.mix);
    }
    types_.push_back(f32 ? QuantType::F32 : t);
    // Validates that the row length fits the block size of the type (throws otherwise).
    (void)row_bytes(types_.back(), s.ne[0]);
    seeds_.push_back(hash_name(opt.seed, s.name));
  }

  if (opt.zipf_s > 0.0) {
    const double k = static_cast<double>(cfg_.n_experts_used);
    const double growth = kAttentionGrowth + kSiluSquare * 1.3 / k;
    router_bias_.resize(static_cast<size_t>(cfg_.n_layers));
    double mean_square = 1.0;  // deepseek2: of the residual before layer l (embedding: 1)
    for (int64_t l = 0; l < cfg_.n_layers; ++l) {
      if (cfg_.is_dense_layer(l)) {  // no router
        mean_square += kAttentionGrowth + deepseek2_ffn_growth(cfg_, l);
        continue;
      }
      // Per-layer permutation: which expert gets which popularity rank.
      std::vector<int64_t> perm(static_cast<size_t>(cfg_.n_experts));
      for (int64_t e = 0; e < cfg_.n_experts; ++e) perm[e] = e;
      uint64_t state = hash_name(opt.seed, "router_skew.blk." + std::to_string(l));
      for (int64_t i = cfg_.n_experts - 1; i > 0; --i) {
        state += kGolden;
        const int64_t j = static_cast<int64_t>(mix64(state) % static_cast<uint64_t>(i + 1));
        std::swap(perm[i], perm[j]);
      }
      // rms(x) before ffn_norm of layer l: embedding (1) + l whole layers + this attention.
      double rms = std::sqrt(1.0 + l * growth + kAttentionGrowth);
      if (cfg_.is_deepseek2()) {
        rms = std::sqrt(mean_square + kAttentionGrowth);
        mean_square += kAttentionGrowth + deepseek2_ffn_growth(cfg_, l);
      }
      const double expected_dim0 = kBiasChannel / rms;
      std::vector<float>& bias = router_bias_[l];
      bias.resize(static_cast<size_t>(cfg_.n_experts));
      for (int64_t rank = 0; rank < cfg_.n_experts; ++rank) {
        const double log_zipf = -opt.zipf_s * std::log(static_cast<double>(rank + 1));
        bias[perm[rank]] = static_cast<float>(kGumbelBeta * log_zipf / expected_dim0);
      }
    }
  }
}

int64_t SyntheticGenerator::tensor_bytes(size_t tensor) const {
  const TensorSpec& s = specs_[tensor];
  return row_bytes(types_[tensor], s.ne[0]) * s.ne[1] * s.ne[2];
}

void SyntheticGenerator::fill_rows(size_t tensor, int64_t row_begin, int64_t row_end,
                                   uint8_t* dst) const {
  const TensorSpec& s = specs_[tensor];
  const QuantType type = types_[tensor];
  const int64_t n = s.ne[0];
  const int64_t stride = row_bytes(type, n);
  const bool skew = !router_bias_.empty();
  std::vector<float> row(static_cast<size_t>(n));
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* x = row.data();
    const uint64_t row_seed = seeds_[tensor] ^ (static_cast<uint64_t>(r) * 0xD1B54A32D192ED03ull);
    switch (s.role) {
      case TensorRole::Norm: {
        const bool qk = s.base == "attn_q_norm" || s.base == "attn_k_norm" ||
                        s.base == "attn_q_a_norm" || s.base == "attn_kv_a_norm";
        std::fill(x, x + n, qk ? kQkNormWeight : 1.0f);
        break;
      }
      case TensorRole::Bias:
        fill_uniform(row_seed, std::sqrt(3.0f) * kScoreBiasStd, x, n);
        break;
      case TensorRole::Embedding:
        fill_uniform(row_seed, std::sqrt(3.0f), x, n);
        if (skew) x[0] = kBiasChannel;
        break;
      case TensorRole::Router:
        fill_uniform(row_seed, std::sqrt(3.0f / static_cast<float>(n)), x, n);
        if (skew) x[0] = router_bias_[s.layer][r];
        break;
      case TensorRole::Matrix:
      case TensorRole::Experts: {
        // Rows that write hidden dimension 0 stay zero under skew (the bias channel).
        const bool zero =
            skew && ((s.base == "attn_output" && r == 0) ||
                     (s.base == "ffn_down_exps" && r % s.ne[1] == 0) ||
                     ((s.base == "ffn_down_shexp" || s.base == "ffn_down") && r == 0));
        if (zero) {
          std::fill(x, x + n, 0.0f);
        } else {
          float gain = s.base == "attn_output" ? kAttnOutputGain : 1.0f;
          if (cfg_.is_deepseek2() && s.base == "attn_output") gain /= kQkNormWeight;
          if (s.base == "attn_q" && cfg_.is_deepseek2()) gain = kQkNormWeight;
          fill_uniform(row_seed, gain * std::sqrt(3.0f / static_cast<float>(n)), x, n);
        }
        break;
      }
    }
    uint8_t* out = dst + (r - row_begin) * stride;
    if (type == QuantType::F32) {
      std::memcpy(out, x, static_cast<size_t>(n) * sizeof(float));
    } else {
      quantize_row(type, x, out, n);
    }
  }
}

void SyntheticGenerator::stream(size_t tensor, gguf::ByteSink& out) const {
  const TensorSpec& s = specs_[tensor];
  const int64_t stride = row_bytes(types_[tensor], s.ne[0]);
  const int64_t rows = s.ne[1] * s.ne[2];
  const int64_t rows_per_chunk =
      std::max<int64_t>(1, static_cast<int64_t>(kSynthChunkBytes) / stride);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  // A window of chunks is generated in parallel, then written in order; memory stays at
  // window * kSynthChunkBytes whatever the tensor's size.
  const int64_t window = std::min<int64_t>(chunks, 2 * thread_count());
  std::vector<std::vector<uint8_t>> bufs(static_cast<size_t>(window));
  for (int64_t first = 0; first < chunks; first += window) {
    const int64_t count = std::min(window, chunks - first);
    parallel_items(count, [&](int64_t i) {
      const int64_t r0 = (first + i) * rows_per_chunk;
      const int64_t r1 = std::min(rows, r0 + rows_per_chunk);
      bufs[i].resize(static_cast<size_t>((r1 - r0) * stride));
      fill_rows(tensor, r0, r1, bufs[i].data());
    });
    // After an interrupt some buffers are stale; the sink throws Interrupted before writing.
    for (int64_t i = 0; i < count; ++i) out.write(bufs[i].data(), bufs[i].size());
  }
}

gguf::Writer SyntheticGenerator::gguf_writer() const {
  gguf::Writer w;
  ModelConfig named = cfg_;
  named.name = "ktune synthetic " + cfg_.name;
  set_gguf_model_metadata(w, named, opt_.quant);
  if (opt_.mix == QuantMix::Q4_K_M) w.set("general.file_type", gguf::Value::u32(15));
  if (opt_.mix == QuantMix::Q5_K_M) w.set("general.file_type", gguf::Value::u32(17));
  // Provenance: enough to regenerate the same bytes.
  w.set("ktune.synthetic.seed", gguf::Value::u64(opt_.seed));
  w.set("ktune.synthetic.preset", gguf::Value::string(cfg_.name));
  w.set("ktune.synthetic.router_skew", gguf::Value::f64(opt_.zipf_s));
  for (size_t i = 0; i < specs_.size(); ++i) {
    const TensorSpec& s = specs_[i];
    w.add_tensor(s.name, std::vector<int64_t>(s.ne.begin(), s.ne.begin() + s.n_dims), types_[i]);
  }
  return w;
}

ModelWeights make_synthetic_model(const SynthOptions& opt) {
  const SyntheticGenerator gen(opt);
  const std::vector<TensorSpec>& specs = gen.tensors();

  // One arena for the whole model, each tensor at a 4 KiB boundary. mmap rather than new: pages
  // are touched first by the threads that fill them, and huge pages make 17 GB cheap to fault in.
  constexpr int64_t kAlign = 4096;
  std::vector<int64_t> offsets(specs.size());
  int64_t total = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    offsets[i] = total;
    total += (gen.tensor_bytes(i) + kAlign - 1) / kAlign * kAlign;
  }
  void* mem = mmap(nullptr, static_cast<size_t>(total), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    throw Error("synth:" + gen.config().name,
                "cannot allocate " + std::to_string(total >> 20) + " MiB for the model",
                "use a smaller preset or a smaller quant type, or free memory");
  }
#ifdef MADV_HUGEPAGE
  madvise(mem, static_cast<size_t>(total), MADV_HUGEPAGE);
#endif
  const size_t map_size = static_cast<size_t>(total);
  std::shared_ptr<void> arena(mem, [map_size](void* p) { munmap(p, map_size); });
  auto* base = static_cast<uint8_t*>(mem);

  // Work items of ~256 KiB of output so 16+ threads stay balanced on any preset.
  struct Item {
    size_t tensor;
    int64_t r0, r1;
  };
  std::vector<Item> items;
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t stride = row_bytes(gen.type(i), specs[i].ne[0]);
    const int64_t rows = specs[i].ne[1] * specs[i].ne[2];
    const int64_t per = std::max<int64_t>(1, (int64_t{256} << 10) / stride);
    for (int64_t r = 0; r < rows; r += per) items.push_back({i, r, std::min(rows, r + per)});
  }
  parallel_items(static_cast<int64_t>(items.size()), [&](int64_t k) {
    const Item& it = items[k];
    const int64_t stride = row_bytes(gen.type(it.tensor), specs[it.tensor].ne[0]);
    gen.fill_rows(it.tensor, it.r0, it.r1, base + offsets[it.tensor] + it.r0 * stride);
  });
  throw_if_interrupted("synth:" + gen.config().name + " was not built; nothing was measured");

  ModelWeights w;
  w.cfg = gen.config();
  w.source = "synth:" + w.cfg.name + ":" + synth_quant_label(opt);
  w.quant = opt.quant;
  const std::vector<TensorView*> slots = w.tensor_slots();
  for (size_t i = 0; i < specs.size(); ++i) {
    TensorView& v = *slots[i];
    v.name = specs[i].name;
    v.type = gen.type(i);
    v.ne = specs[i].ne;
    v.data = base + offsets[i];
  }
  w.storage.push_back(std::move(arena));
  return w;
}

ModelWeights synthetic_model_shape(const SynthOptions& opt) {
  const SyntheticGenerator gen(opt);
  ModelWeights w;
  w.cfg = gen.config();
  w.source = "synth:" + w.cfg.name + ":" + synth_quant_label(opt);
  w.quant = opt.quant;
  const std::vector<TensorView*> slots = w.tensor_slots();
  for (size_t i = 0; i < gen.tensors().size(); ++i) {
    TensorView& v = *slots[i];
    v.name = gen.tensors()[i].name;
    v.type = gen.type(i);
    v.ne = gen.tensors()[i].ne;
  }
  return w;
}

void write_synthetic_gguf(const SynthOptions& opt, const std::string& path,
                          const ProgressFn& progress) {
  const SyntheticGenerator gen(opt);
  const gguf::Writer writer = gen.gguf_writer();
  writer.write(
      path,
      [&](size_t index, const gguf::TensorInfo&, gguf::ByteSink& out) { gen.stream(index, out); },
      progress);
}

}  // namespace ktune
