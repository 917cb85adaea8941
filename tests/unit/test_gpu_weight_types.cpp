// Host-side rules of the GPU engine's K-quant support, without a GPU:
//   GpuWeightTypes.*   which tensor types the GPU engine takes (check_gpu_tensor_types): a
//                      Q4_K_M-style mix passes; F16 matrices, ggml types ktune cannot compute (IQ
//                      quants), non-F32 norms and gate/up experts of different types are refused
//                      with the tensor and the type named.
//   SynthMix.*         synth:PRESET:q4_k_m / q5_k_m: the per-tensor types `ktune quantize
//                      --mixed` gives, the spec's label, and the memory planner's bytes of such a
//                      model (weight_bytes of the typed shape = the sum of its tensors' bytes).
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "ktune/engine/error.h"
#include "ktune/engine/gpu_weight_types.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/quantize.h"
#include "ktune/engine/synthetic.h"

namespace ktune {
namespace {

ModelWeights shape(const std::string& spec) {
  return synthetic_model_shape(parse_synth_spec(spec));
}

std::string refusal(const ModelWeights& w) {
  try {
    check_gpu_tensor_types(w, 0, w.cfg.n_layers, true, true);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(GpuWeightTypes, MatrixTypes) {
  for (QuantType t : {QuantType::Q4_0, QuantType::Q8_0, QuantType::Q4_K, QuantType::Q5_K,
                      QuantType::Q6_K, QuantType::BF16, QuantType::F32}) {
    EXPECT_TRUE(gpu_matrix_type_supported(t)) << quant_name(t);
    EXPECT_TRUE(gpu_embedding_type_supported(t)) << quant_name(t);
  }
  EXPECT_FALSE(gpu_matrix_type_supported(QuantType::F16));
  EXPECT_TRUE(gpu_embedding_type_supported(QuantType::F16));
  EXPECT_FALSE(gpu_matrix_type_supported(QuantType::Q8_K));
  EXPECT_FALSE(gpu_matrix_type_supported(static_cast<QuantType>(16)));     // IQ2_XXS
  EXPECT_FALSE(gpu_embedding_type_supported(static_cast<QuantType>(11)));  // Q3_K
}

TEST(GpuWeightTypes, MixedKQuantModelsPass) {
  for (const char* spec : {"synth:tiny:q4_k_m", "synth:tiny:q5_k_m", "synth:tiny:q4_k",
                           "synth:tiny:q6_k", "synth:qwen3-30b-a3b:q4_k_m", "synth:tiny:q4_0"}) {
    EXPECT_EQ(refusal(shape(spec)), "") << spec;
  }
}

TEST(GpuWeightTypes, RefusalsNameTheTensorAndType) {
  // F16 matrices: the first one checked is the output head.
  std::string e = refusal(shape("synth:tiny:f16"));
  EXPECT_NE(e.find("output.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("F16"), std::string::npos) << e;
  EXPECT_NE(e.find("not supported by the GPU engine"), std::string::npos) << e;
  EXPECT_NE(e.find("Q4_K"), std::string::npos) << e;  // the fix lists what works

  // A ggml type ktune cannot compute with at all (an IQ quant) in one layer.
  ModelWeights w = shape("synth:tiny:q4_k_m");
  w.layers[1].wq.type = static_cast<QuantType>(16);
  e = refusal(w);
  EXPECT_NE(e.find("blk.1.attn_q.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("IQ2_XXS"), std::string::npos) << e;
  // Only the stage's own layers are checked.
  EXPECT_NO_THROW(check_gpu_tensor_types(w, 2, 4, false, true));
  EXPECT_THROW(check_gpu_tensor_types(w, 0, 2, false, false), Error);

  // Norms must be F32.
  w = shape("synth:tiny:q4_k_m");
  w.layers[2].ffn_norm.type = QuantType::BF16;
  e = refusal(w);
  EXPECT_NE(e.find("blk.2.ffn_norm.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("F32"), std::string::npos) << e;

  // gate and up experts of one layer in different types.
  w = shape("synth:tiny:q4_k_m");
  w.layers[3].up_exps.type = QuantType::Q5_K;
  e = refusal(w);
  EXPECT_NE(e.find("blk.3.ffn_up_exps.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("Q5_K"), std::string::npos) << e;
  EXPECT_NE(e.find("Q4_K"), std::string::npos) << e;

  // The embedding table may be F16 (a row lookup), the head may not when tied to it.
  w = shape("synth:tiny:q4_k_m");
  w.tok_embd.type = QuantType::F16;
  EXPECT_EQ(refusal(w), "");
  w.tok_embd.type = QuantType::Q8_K;
  e = refusal(w);
  EXPECT_NE(e.find("token_embd.weight"), std::string::npos) << e;
}

// ---------------------------------------------------------------------------------------------

TEST(SynthMix, SpecsParseToTheMix) {
  SynthOptions o = parse_synth_spec("synth:tiny:q4_k_m");
  EXPECT_EQ(o.mix, QuantMix::Q4_K_M);
  EXPECT_EQ(o.quant, QuantType::Q4_K);
  EXPECT_EQ(synth_quant_label(o), "q4_k_m");
  o = parse_synth_spec("synth:TINY:Q5_K_M");
  EXPECT_EQ(o.mix, QuantMix::Q5_K_M);
  EXPECT_EQ(o.quant, QuantType::Q5_K);
  o = parse_synth_spec("synth:tiny:q6_k");
  EXPECT_EQ(o.mix, QuantMix::None);
  EXPECT_EQ(synth_quant_label(o), "q6_k");
  EXPECT_THROW(parse_synth_spec("synth:tiny:q3_k_m"), Error);
  SynthOptions g;
  set_synth_quant(g, "q4_k_m", "--quant");
  EXPECT_EQ(g.mix, QuantMix::Q4_K_M);
  set_synth_quant(g, "q8_0", "--quant");
  EXPECT_EQ(g.mix, QuantMix::None);
  EXPECT_EQ(g.quant, QuantType::Q8_0);
  EXPECT_THROW(set_synth_quant(g, "iq2_xxs", "--quant"), Error);
}

TEST(SynthMix, TypesAreThoseOfQuantizeMixed) {
  // tiny: 4 layers, 8 experts (llama.cpp's 8-expert rules: Q8_0 attn_k/attn_v, Q5_K attn_output),
  // "more bits" layers 2 and 3 (Q6_K ffn_down), Q6_K output head.
  const ModelWeights w = shape("synth:tiny:q4_k_m");
  EXPECT_EQ(w.source, "synth:tiny:q4_k_m");
  EXPECT_EQ(w.tok_embd.type, QuantType::Q4_K);
  EXPECT_EQ(w.output.type, QuantType::Q6_K);
  EXPECT_EQ(w.output_norm.type, QuantType::F32);
  for (int64_t l = 0; l < 4; ++l) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    EXPECT_EQ(lw.wq.type, QuantType::Q4_K);
    EXPECT_EQ(lw.wk.type, QuantType::Q8_0);
    EXPECT_EQ(lw.wv.type, QuantType::Q8_0);
    EXPECT_EQ(lw.wo.type, QuantType::Q5_K);
    EXPECT_EQ(lw.router.type, QuantType::F32);
    EXPECT_EQ(lw.gate_exps.type, QuantType::Q4_K);
    EXPECT_EQ(lw.up_exps.type, QuantType::Q4_K);
    EXPECT_EQ(lw.down_exps.type, l >= 2 ? QuantType::Q6_K : QuantType::Q4_K) << "layer " << l;
  }
  // qwen3-30b-a3b (128 experts): Q6_K attn_v and ffn_down in the more-bits layers only.
  const ModelWeights q = shape("synth:qwen3-30b-a3b:q4_k_m");
  std::map<QuantType, int> down, v;
  for (const LayerWeights& lw : q.layers) {
    ++down[lw.down_exps.type];
    ++v[lw.wv.type];
    EXPECT_EQ(lw.wk.type, QuantType::Q4_K);
    EXPECT_EQ(lw.wo.type, QuantType::Q4_K);
  }
  EXPECT_GT(down[QuantType::Q6_K], 0);
  EXPECT_GT(down[QuantType::Q4_K], 0);
  EXPECT_EQ(down[QuantType::Q6_K], v[QuantType::Q6_K]);
}

TEST(SynthMix, PlannerBytesFollowTheTensorTypes) {
  const ModelWeights w = shape("synth:tiny:q4_k_m");
  const WeightBytes b = weight_bytes(w);
  int64_t sum = b.embedding + b.head;
  for (size_t l = 0; l < b.attention.size(); ++l) {
    sum += b.attention[l] + b.expert[l] * w.cfg.n_experts;
  }
  EXPECT_EQ(sum, w.weight_bytes());
  // A Q6_K ffn_down expert (layer 3) weighs more than a Q4_K one (layer 0): 210 vs 144 bytes per
  // 256 weights of its down matrix.
  const int64_t down_elems = w.cfg.hidden * w.cfg.expert_ffn;
  EXPECT_EQ(b.expert[3] - b.expert[0], down_elems / 256 * (210 - 144));
  // The head is Q6_K, the embedding Q4_K.
  EXPECT_EQ(b.embedding, w.cfg.vocab * w.cfg.hidden / 256 * 144);
  EXPECT_EQ(b.head, w.cfg.vocab * w.cfg.hidden / 256 * 210 + 4 * w.cfg.hidden);
}

}  // namespace
}  // namespace ktune
