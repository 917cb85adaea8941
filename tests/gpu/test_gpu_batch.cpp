// Concurrent sequences on the GPU (GpuEngineOptions::max_sequences, GpuEngine::decode_batch;
// ctest label `gpu`, skipped with query_gpus()'s reason when there is no usable GPU).
//
//   GpuBatchAttention.*              the batched decode attention (each row over its own cache
//       and position) against the float64 reference and bit for bit against the single-sequence
//       launcher on that sequence's cache: the two-launch path (launch_attention_decode_batch)
//       and the engine's fused one (qk norm + RoPE, one cluster launch on sm_90); the new token
//       stored in its own sequence's cache only.
//   GpuBatch.EachSequenceAsAlone*    the key test: sequences with different prompts (lengths 3..22)
//       prefilled into their own caches, then decoded together (decode_batch, B = 1, 3, 8, 32)
//       give, per sequence and step, the logits bits and greedy tokens that sequence gives
//       decoded alone (B = 1, in sequence 0's cache), and generate_greedy_batch (tokens chosen
//       on the device, no host in the loop) gives the same tokens. All on the GPU and hybrid
//       (experts on the CPU through CpuMoeBatch: flags and host-node hand-offs), CUDA graph on and
//       off; Q8_0 and Q4_0.
//   GpuBatch.CloseToDecodeSteps      the batched step's logits against decode()'s (float32
//       activations): the difference is fp16 rounding alone (GpuPrefill.MatchesDecodeSteps'
//       bound).
//   GpuBatch.SingleSequenceApiPerSequence  set_sequence: prefill/decode/generate_greedy of one
//       sequence do not disturb another's cache or position; decode() after decode_batch goes on
//       from the batched position.
//   GpuBatch.Errors                  too many sequences, tokens outside the vocabulary, a full
//       context (refused before anything runs), bad sequence ids, max_sequences on a layer split.
//   GpuBatch.DeviceBytesWithinPlan   what the engine allocates for 8 sequences fits what the
//       memory planner plans for runtime.batch 8 (KV cache per sequence + batch workspace).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu/engine_test_util.h"
#include "gpu/gpu_test_util.h"
#include "gpu/kernel_test_util.h"
#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/cuda/batch_kernels.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/placement.h"
#include "ktune/engine/quant.h"
#include "runtime/cpu_ops.h"

namespace ktune {
namespace {

using cuda::test::Dev;
using cuda::test::Rng;
using test::tiny;

// ---- the batched attention kernel ------------------------------------------------------------

struct AttnShape {
  int64_t n_heads, n_kv, hd, max_ctx;
};

// Float64 attention of one query row over one sequence's cache (positions < pos, fp16) plus
// k_new / v_new (float32) at pos.
std::vector<double> attention_ref(const AttnShape& c, const float* q, const float* kn,
                                  const float* vn, const uint16_t* kc, const uint16_t* vc,
                                  int pos) {
  const int64_t group = c.n_heads / c.n_kv, hd = c.hd;
  std::vector<double> out(static_cast<size_t>(c.n_heads * hd), 0.0), s(pos + 1);
  for (int64_t h = 0; h < c.n_heads; ++h) {
    const int64_t kvh = h / group;
    auto kval = [&](int p, int64_t d) {
      return p == pos ? double(kn[kvh * hd + d])
                      : double(fp16_to_fp32(kc[(kvh * c.max_ctx + p) * hd + d]));
    };
    auto vval = [&](int p, int64_t d) {
      return p == pos ? double(vn[kvh * hd + d])
                      : double(fp16_to_fp32(vc[(kvh * c.max_ctx + p) * hd + d]));
    };
    double mx = -INFINITY;
    for (int p = 0; p <= pos; ++p) {
      double d0 = 0;
      for (int64_t d = 0; d < hd; ++d) d0 += q[h * hd + d] * kval(p, d);
      s[p] = d0 / std::sqrt(double(hd));
      mx = std::max(mx, s[p]);
    }
    double sum = 0;
    for (int p = 0; p <= pos; ++p) sum += (s[p] = std::exp(s[p] - mx));
    for (int p = 0; p <= pos; ++p) {
      for (int64_t d = 0; d < hd; ++d) out[h * hd + d] += s[p] / sum * vval(p, d);
    }
  }
  return out;
}

double rel_l2(const float* out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = double(out[i]) - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Runs B sequences through the batched launcher (fused: q/k norm + RoPE) and each sequence
// alone through the single-sequence launcher on a copy of its cache.
void check_batched_attention(const AttnShape& c, bool fused, Rng& rng) {
  const float eps = 1e-6f;
  const int64_t hd = c.hd, nq = c.n_heads * hd, nkv = c.n_kv * hd;
  const int64_t seq_n = c.n_kv * c.max_ctx * hd;
  // Positions on both sides of the 64-position cluster chunks and the 256-position splits.
  std::vector<int> positions = {0, 1, 63, 64, 255, 257, static_cast<int>(c.max_ctx) - 1};
  positions.push_back(rng.uniform_int(2, static_cast<int>(c.max_ctx) - 2));
  const int64_t B = static_cast<int64_t>(positions.size());
  // Caches: random fp16 before each sequence's position, NaN from it on (never read).
  std::vector<uint16_t> kc(static_cast<size_t>(B * seq_n), 0x7E00), vc(kc.size(), 0x7E00);
  for (int64_t b = 0; b < B; ++b) {
    const int pos = positions[static_cast<size_t>(b)];
    for (int64_t kvh = 0; kvh < c.n_kv; ++kvh) {
      auto kr = rng.normal(static_cast<size_t>(pos * hd)),
           vr = rng.normal(static_cast<size_t>(pos * hd));
      for (int64_t i = 0; i < pos * hd; ++i) {
        kc[static_cast<size_t>(b * seq_n + kvh * c.max_ctx * hd + i)] =
            fp32_to_fp16(kr[static_cast<size_t>(i)]);
        vc[static_cast<size_t>(b * seq_n + kvh * c.max_ctx * hd + i)] =
            fp32_to_fp16(vr[static_cast<size_t>(i)]);
      }
    }
  }
  const auto q = rng.normal(static_cast<size_t>(B * nq), 2.0f);
  const auto k = rng.normal(static_cast<size_t>(B * nkv), 2.0f);
  const auto v = rng.normal(static_cast<size_t>(B * nkv));
  const auto inv = cuda::rope_inv_freq(1e6f, hd);
  const auto qw = rng.normal(static_cast<size_t>(hd), 0.2f, 1.0f);
  const auto kw = rng.normal(static_cast<size_t>(hd), 0.2f, 1.0f);
  std::vector<int32_t> pos32(positions.begin(), positions.end());
  Dev<float> dq(q), dk(k), dv(v), dinv(inv), dqw(qw), dkw(kw), dout(static_cast<size_t>(B * nq));
  Dev<uint16_t> dkc(kc), dvc(vc);
  Dev<int32_t> dpos(pos32);
  cuda::DeviceBuffer ws(cuda::attention_decode_batch_workspace_bytes(B, c.n_heads, hd, c.max_ctx));
  cuda::Stream s;
  if (fused) {
    ASSERT_EQ(cuda::launch_attention_decode_qknorm_rope_batch(
                  dq.ptr(), dk.ptr(), dv.ptr(), dqw.ptr(), dkw.ptr(), eps, dinv.ptr(), dkc.ptr(),
                  dvc.ptr(), seq_n, dpos.ptr(), B, c.n_heads, c.n_kv, hd, c.max_ctx, ws.data(),
                  dout.ptr(), s),
              cudaSuccess);
  } else {
    ASSERT_EQ(cuda::launch_attention_decode_batch(dq.ptr(), dk.ptr(), dv.ptr(), dkc.ptr(),
                                                  dvc.ptr(), seq_n, dpos.ptr(), B, c.n_heads,
                                                  c.n_kv, hd, c.max_ctx, ws.data(), dout.ptr(), s),
              cudaSuccess);
  }
  s.synchronize();
  const auto out = dout.download();
  const auto kc_b = dkc.download(), vc_b = dvc.download();

  cuda::DeviceBuffer ws1(cuda::attention_decode_workspace_bytes(c.n_heads, hd, c.max_ctx));
  for (int64_t b = 0; b < B; ++b) {
    const int pos = positions[static_cast<size_t>(b)];
    SCOPED_TRACE("sequence " + std::to_string(b) + " at " + std::to_string(pos));
    const std::vector<float> qb(q.begin() + b * nq, q.begin() + (b + 1) * nq);
    const std::vector<float> kb(k.begin() + b * nkv, k.begin() + (b + 1) * nkv);
    const std::vector<float> vb(v.begin() + b * nkv, v.begin() + (b + 1) * nkv);
    const std::vector<uint16_t> kcb(kc.begin() + b * seq_n, kc.begin() + (b + 1) * seq_n);
    const std::vector<uint16_t> vcb(vc.begin() + b * seq_n, vc.begin() + (b + 1) * seq_n);
    // Alone, through the single-sequence launcher: the same bits, the same cache.
    Dev<float> dq1(qb), dk1(kb), dv1(vb), dout1(static_cast<size_t>(nq));
    Dev<uint16_t> dkc1(kcb), dvc1(vcb);
    Dev<int32_t> dpos1(std::vector<int32_t>{pos});
    if (fused) {
      ASSERT_EQ(cuda::launch_attention_decode_qknorm_rope(
                    dq1.ptr(), dk1.ptr(), dv1.ptr(), dqw.ptr(), dkw.ptr(), eps, dinv.ptr(),
                    dkc1.ptr(), dvc1.ptr(), dpos1.ptr(), c.n_heads, c.n_kv, hd, c.max_ctx,
                    ws1.data(), dout1.ptr(), s),
                cudaSuccess);
    } else {
      ASSERT_EQ(cuda::launch_attention_decode(dq1.ptr(), dk1.ptr(), dv1.ptr(), dkc1.ptr(),
                                              dvc1.ptr(), dpos1.ptr(), c.n_heads, c.n_kv, hd,
                                              c.max_ctx, ws1.data(), dout1.ptr(), s),
                cudaSuccess);
    }
    s.synchronize();
    const auto out1 = dout1.download();
    EXPECT_EQ(std::memcmp(out1.data(), out.data() + b * nq, static_cast<size_t>(nq) * 4), 0)
        << "batched row differs from the single-sequence launcher";
    const auto kc1 = dkc1.download(), vc1 = dvc1.download();
    EXPECT_TRUE(std::equal(kc1.begin(), kc1.end(), kc_b.begin() + b * seq_n) &&
                std::equal(vc1.begin(), vc1.end(), vc_b.begin() + b * seq_n))
        << "caches differ from the single-sequence launcher's";
    // Against float64: the reference of the normalized, rotated q and k (CPU ops).
    std::vector<float> qn(qb), kn(kb);
    if (fused) {
      std::vector<float> cs(static_cast<size_t>(hd));
      cpu_ops::rope_table(pos, inv.data(), hd, cs.data());
      for (int64_t h = 0; h < c.n_heads; ++h) {
        cpu_ops::rmsnorm(&qb[h * hd], qw.data(), eps, hd, &qn[h * hd]);
        cpu_ops::rope_neox(&qn[h * hd], cs.data(), hd);
      }
      for (int64_t h = 0; h < c.n_kv; ++h) {
        cpu_ops::rmsnorm(&kb[h * hd], kw.data(), eps, hd, &kn[h * hd]);
        cpu_ops::rope_neox(&kn[h * hd], cs.data(), hd);
      }
    }
    const auto ref = attention_ref(c, qn.data(), kn.data(), vb.data(), kcb.data(), vcb.data(), pos);
    EXPECT_LE(rel_l2(out.data() + b * nq, ref), 2e-5);
    // The new token's k/v went into this sequence's cache at its position, nothing else moved.
    for (int64_t kvh = 0; kvh < c.n_kv; ++kvh) {
      for (int64_t d = 0; d < hd; ++d) {
        const size_t at = static_cast<size_t>(b * seq_n + (kvh * c.max_ctx + pos) * hd + d);
        ASSERT_NEAR(fp16_to_fp32(kc_b[at]), kn[static_cast<size_t>(kvh * hd + d)],
                    1e-3f * std::max(1.0f, std::fabs(kn[static_cast<size_t>(kvh * hd + d)])));
        ASSERT_EQ(vc_b[at], fp32_to_fp16(vb[static_cast<size_t>(kvh * hd + d)]));
      }
    }
  }
  // Outside the B new positions, no cache element changed.
  std::vector<uint16_t> kc2 = kc_b, vc2 = vc_b;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t kvh = 0; kvh < c.n_kv; ++kvh) {
      for (int64_t d = 0; d < hd; ++d) {
        const size_t at = static_cast<size_t>(
            b * seq_n + (kvh * c.max_ctx + positions[static_cast<size_t>(b)]) * hd + d);
        kc2[at] = kc[at];
        vc2[at] = vc[at];
      }
    }
  }
  EXPECT_TRUE(kc2 == kc && vc2 == vc) << "a cache changed outside its sequence's position";
}

TEST(GpuBatchAttention, TwoLaunchPathMatchesReferenceAndSingleLauncher) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  for (const AttnShape& c : {AttnShape{8, 2, 128, 300}, AttnShape{4, 1, 64, 520}}) {
    check_batched_attention(c, false, rng);
  }
}

TEST(GpuBatchAttention, QkNormRopeMatchesReferenceAndSingleLauncher) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  // Groups 4 and 2 (cluster path), and head_dim 96 (the two-launch fallback with norms).
  for (const AttnShape& c :
       {AttnShape{32, 4, 128, 600}, AttnShape{4, 2, 64, 300}, AttnShape{4, 2, 96, 300}}) {
    check_batched_attention(c, true, rng);
  }
}

TEST(GpuBatchAttention, RefusesBadArguments) {
  KTUNE_REQUIRE_GPU();
  Dev<float> buf(4096);
  Dev<uint16_t> cache(4096);
  Dev<int32_t> pos(4);
  cuda::DeviceBuffer ws(1 << 16);
  // seq_stride smaller than one sequence's cache; batch 0.
  EXPECT_EQ(cuda::launch_attention_decode_batch(buf.ptr(), buf.ptr(), buf.ptr(), cache.ptr(),
                                                cache.ptr(), 100, pos.ptr(), 2, 4, 2, 64, 8,
                                                ws.data(), buf.ptr(), nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::launch_attention_decode_batch(buf.ptr(), buf.ptr(), buf.ptr(), cache.ptr(),
                                                cache.ptr(), 2 * 8 * 64, pos.ptr(), 0, 4, 2, 64, 8,
                                                ws.data(), buf.ptr(), nullptr),
            cudaErrorInvalidValue);
  cudaGetLastError();
}

// ---- the engine ------------------------------------------------------------------------------

std::vector<int32_t> prompt(int64_t n, uint32_t seed, int64_t vocab) {
  std::mt19937 gen(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(gen() % static_cast<uint32_t>(vocab));
  return t;
}

// Prompt b: 3 + (5 b mod 20) tokens, so lengths (and positions) differ across sequences.
std::vector<std::vector<int32_t>> prompts(int64_t n, int64_t vocab) {
  std::vector<std::vector<int32_t>> p;
  for (int64_t b = 0; b < n; ++b) {
    p.push_back(prompt(3 + (5 * b) % 20, 1000 + static_cast<uint32_t>(b), vocab));
  }
  return p;
}

struct Variant {
  const char* name;
  bool hybrid;
  bool graph;
  CpuHandoff handoff = CpuHandoff::Flags;
};

GpuEngineOptions batch_opt(const ModelWeights& m, const Variant& v, int64_t sequences) {
  GpuEngineOptions o;
  o.max_context = 64;
  o.cuda_graph = v.graph;
  o.max_sequences = sequences;
  o.max_prefill_chunk = 16;
  if (v.hybrid) {
    o.expert_on_gpu = test::expert_map(m.cfg, test::Split::EvenOnGpu);
    o.cpu_threads = 3;
    o.pin_threads = false;
    o.cpu_handoff = v.handoff;
  }
  return o;
}

struct Trace {
  std::vector<int32_t> tokens;  // per step
  std::vector<float> logits;    // per step, vocab each
};

// Sequence b of `ps` alone: prefill into sequence 0's cache, then `steps` batched steps of one
// sequence, greedy.
Trace alone(GpuEngine& e, const std::vector<int32_t>& p, int64_t steps, int64_t vocab) {
  Trace t;
  e.reset();
  e.set_sequence(0);
  std::vector<float> lg;
  e.prefill(p.data(), static_cast<int64_t>(p.size()), &lg);
  int32_t tok = CpuEngine::argmax(lg.data(), vocab);
  for (int64_t i = 0; i < steps; ++i) {
    t.tokens.push_back(tok);
    e.decode_batch(&tok, 1, &lg);
    t.logits.insert(t.logits.end(), lg.begin(), lg.end());
    tok = CpuEngine::argmax(lg.data(), vocab);
  }
  t.tokens.push_back(tok);
  return t;
}

// Every sequence prefilled into its own cache; returns the first tokens.
std::vector<int32_t> prefill_all(GpuEngine& e, const std::vector<std::vector<int32_t>>& ps,
                                 int64_t vocab) {
  e.reset();
  std::vector<int32_t> first;
  std::vector<float> lg;
  for (size_t b = 0; b < ps.size(); ++b) {
    e.set_sequence(static_cast<int64_t>(b));
    e.prefill(ps[b].data(), static_cast<int64_t>(ps[b].size()), &lg);
    first.push_back(CpuEngine::argmax(lg.data(), vocab));
  }
  return first;
}

void check_batch_equals_alone(QuantType qt, const Variant& v) {
  const ModelWeights& m = tiny(qt);
  const int64_t V = m.cfg.vocab, steps = 6;
  GpuEngine e(m, batch_opt(m, v, 32));
  const auto ps = prompts(32, V);
  std::vector<Trace> ref;
  for (const auto& p : ps) ref.push_back(alone(e, p, steps, V));
  for (int64_t B : {1, 3, 8, 32}) {
    SCOPED_TRACE(std::string(v.name) + " " + quant_name(qt) + " B " + std::to_string(B));
    const std::vector<std::vector<int32_t>> pb(ps.begin(), ps.begin() + B);
    // decode_batch, greedy on the host: logits bits per sequence and step.
    std::vector<int32_t> toks = prefill_all(e, pb, V);
    std::vector<float> lg;
    int mismatched_logits = 0, mismatched_tokens = 0;
    for (int64_t i = 0; i < steps; ++i) {
      for (int64_t b = 0; b < B; ++b) {
        mismatched_tokens += toks[static_cast<size_t>(b)] !=
                             ref[static_cast<size_t>(b)].tokens[static_cast<size_t>(i)];
      }
      e.decode_batch(toks.data(), B, &lg);
      ASSERT_EQ(lg.size(), static_cast<size_t>(B * V));
      for (int64_t b = 0; b < B; ++b) {
        const float* want = ref[static_cast<size_t>(b)].logits.data() + i * V;
        mismatched_logits += std::memcmp(lg.data() + b * V, want, static_cast<size_t>(V) * 4) != 0;
        toks[static_cast<size_t>(b)] = CpuEngine::argmax(lg.data() + b * V, V);
      }
    }
    EXPECT_EQ(mismatched_logits, 0) << "(sequence, step) rows whose logits differ from alone";
    EXPECT_EQ(mismatched_tokens, 0);
    for (int64_t b = 0; b < B; ++b) {
      EXPECT_EQ(e.position(b), static_cast<int64_t>(pb[static_cast<size_t>(b)].size()) + steps);
    }
    // generate_greedy_batch: the same tokens, chosen on the device.
    const std::vector<int32_t> first = prefill_all(e, pb, V);
    const std::vector<int32_t> gen = e.generate_greedy_batch(first.data(), B, steps);
    ASSERT_EQ(gen.size(), static_cast<size_t>(B * steps));
    int mismatched_gen = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < steps; ++i) {
        mismatched_gen += gen[static_cast<size_t>(b * steps + i)] !=
                          ref[static_cast<size_t>(b)].tokens[static_cast<size_t>(i + 1)];
      }
    }
    EXPECT_EQ(mismatched_gen, 0) << "generate_greedy_batch tokens differ from alone";
  }
}

TEST(GpuBatch, EachSequenceAsAloneAllGpu) {
  KTUNE_REQUIRE_GPU();
  for (bool graph : {true, false}) {
    check_batch_equals_alone(QuantType::Q8_0,
                             {graph ? "all gpu, graph" : "all gpu, no graph", false, graph});
  }
  check_batch_equals_alone(QuantType::Q4_0, {"all gpu, graph", false, true});
}

TEST(GpuBatch, EachSequenceAsAloneHybrid) {
  KTUNE_REQUIRE_GPU();
  for (bool graph : {true, false}) {
    check_batch_equals_alone(QuantType::Q8_0,
                             {graph ? "hybrid, graph" : "hybrid, no graph", true, graph});
  }
  check_batch_equals_alone(QuantType::Q4_0,
                           {"hybrid host_node, graph", true, true, CpuHandoff::HostNode});
}

// Every expert of the first half of the layers on the GPU, none of the second half: layers with
// no GPU expert (all-CPU slot map) and layers with no CPU expert in one step.
TEST(GpuBatch, EachSequenceAsAloneHybridWholeLayers) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const int64_t V = m.cfg.vocab, steps = 4, B = 5;
  GpuEngineOptions o = batch_opt(m, {"", true, true}, B);
  o.expert_on_gpu = test::expert_map(m.cfg, test::Split::FirstHalfLayersOnGpu);
  GpuEngine e(m, o);
  const auto ps = prompts(B, V);
  std::vector<Trace> ref;
  for (const auto& p : ps) ref.push_back(alone(e, p, steps, V));
  const std::vector<int32_t> first = prefill_all(e, ps, V);
  const std::vector<int32_t> gen = e.generate_greedy_batch(first.data(), B, steps);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < steps; ++i) {
      EXPECT_EQ(gen[static_cast<size_t>(b * steps + i)],
                ref[static_cast<size_t>(b)].tokens[static_cast<size_t>(i + 1)])
          << "sequence " << b << " step " << i;
    }
  }
}

// fp16 noise of the output head's dots (GpuPrefill.MatchesDecodeSteps' measure): relative RMS
// error with fp16-rounded activations and weights.
double fp16_noise(const ModelWeights& m) {
  const TensorView& w = m.output.data ? m.output : m.tok_embd;
  const int64_t n = w.row_len();
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(n)), row(x.size());
  double se = 0, sr = 0;
  for (int trial = 0; trial < 4; ++trial) {
    for (auto& v : x) v = nd(gen);
    for (int64_t r = 0; r < std::min<int64_t>(w.n_rows(), 256); ++r) {
      dequantize_row(w.type, w.row(r), row.data(), n);
      double a = 0, b = 0;
      for (int64_t c = 0; c < n; ++c) {
        a += double(row[c]) * x[c];
        b += double(fp16_to_fp32(fp32_to_fp16(row[c]))) * fp16_to_fp32(fp32_to_fp16(x[c]));
      }
      se += (a - b) * (a - b);
      sr += a * a;
    }
  }
  return std::sqrt(se / sr);
}

TEST(GpuBatch, CloseToDecodeSteps) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const int64_t V = m.cfg.vocab, B = 3;
  const double eh = fp16_noise(m);
  const double stages = 1.0 + 5.0 * static_cast<double>(m.cfg.n_layers);
  const double tol = std::max(0.002, 4.0 * eh * std::sqrt(stages));
  GpuEngine batched(m, batch_opt(m, {"", false, true}, B));
  GpuEngine single(m, batch_opt(m, {"", false, true}, 1));
  const auto ps = prompts(B, V);
  const std::vector<int32_t> first = prefill_all(batched, ps, V);
  std::vector<float> lb, ls;
  batched.decode_batch(first.data(), B, &lb);
  int outliers = 0;
  for (int64_t b = 0; b < B; ++b) {
    single.reset();
    single.prefill(ps[static_cast<size_t>(b)].data(),
                   static_cast<int64_t>(ps[static_cast<size_t>(b)].size()), nullptr);
    single.decode(first[static_cast<size_t>(b)], &ls);
    double mx = 0, err = 0;
    for (int64_t i = 0; i < V; ++i) {
      mx = std::max(mx, double(std::fabs(ls[static_cast<size_t>(i)])));
      err = std::max(
          err, double(std::fabs(lb[static_cast<size_t>(b * V + i)] - ls[static_cast<size_t>(i)])));
    }
    const double rel = err / mx;
    std::printf(
        "[GpuBatch] sequence %lld: max|batched - decode()| %.4f%% of max|logit| %.4g, "
        "tolerance %.3f%%\n",
        static_cast<long long>(b), 100 * rel, mx, 100 * tol);
    if (rel > tol) {
      ++outliers;
      EXPECT_LE(rel, 4 * tol) << "sequence " << b;
    }
  }
  EXPECT_LE(outliers, 1);
}

TEST(GpuBatch, SingleSequenceApiPerSequence) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const int64_t V = m.cfg.vocab;
  for (bool graph : {true, false}) {
    SCOPED_TRACE(graph ? "graph" : "no graph");
    GpuEngine e(m, batch_opt(m, {"", false, graph}, 2));
    GpuEngine ref(m, batch_opt(m, {"", false, graph}, 1));
    const auto p0 = prompt(9, 1, V), p1 = prompt(4, 2, V);
    // Reference: each sequence in its own engine, greedy with generate_greedy.
    ref.prefill(p0.data(), 9, nullptr);
    const auto want0 = ref.generate_greedy(7, 5);
    ref.reset();
    ref.prefill(p1.data(), 4, nullptr);
    const auto want1 = ref.generate_greedy(11, 5);
    // Interleaved on one engine: sequence 0 prefill, sequence 1 prefill, then alternating.
    e.set_sequence(0);
    e.prefill(p0.data(), 9, nullptr);
    e.set_sequence(1);
    e.prefill(p1.data(), 4, nullptr);
    EXPECT_EQ(e.position(), 4);
    EXPECT_EQ(e.position(0), 9);
    e.set_sequence(0);
    const auto a0 = e.generate_greedy(7, 2);
    e.set_sequence(1);
    const auto a1 = e.generate_greedy(11, 5);
    e.set_sequence(0);
    const auto b0 = e.generate_greedy(a0.back(), 3);
    EXPECT_EQ(std::vector<int32_t>({a0[0], a0[1], b0[0], b0[1], b0[2]}), want0);
    EXPECT_EQ(a1, want1);
    EXPECT_EQ(e.position(0), 14);
    EXPECT_EQ(e.position(1), 9);
    EXPECT_EQ(e.sequence(), 0);
    // After a batched step, decode() of the current sequence goes on from its new position.
    std::vector<int32_t> toks = {b0.back(), a1.back()};
    std::vector<float> lg;
    e.decode_batch(toks.data(), 2, &lg);
    EXPECT_EQ(e.position(), 15);
    EXPECT_EQ(e.position(1), 10);
    e.decode(CpuEngine::argmax(lg.data(), V), nullptr);
    EXPECT_EQ(e.position(), 16);
    EXPECT_EQ(e.position(1), 10);
  }
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(GpuBatch, Errors) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  GpuEngineOptions o = batch_opt(m, {"", false, true}, 3);
  o.max_context = 8;
  GpuEngine e(m, o);
  EXPECT_EQ(e.max_sequences(), 3);
  std::vector<int32_t> toks = {1, 2, 3, 4};
  EXPECT_NE(error_of([&] { e.decode_batch(toks.data(), 4, nullptr); }).find("4 sequences"),
            std::string::npos);
  toks[1] = static_cast<int32_t>(m.cfg.vocab);
  EXPECT_NE(
      error_of([&] { e.decode_batch(toks.data(), 3, nullptr); }).find("outside the vocabulary"),
      std::string::npos);
  toks[1] = 2;
  EXPECT_NE(error_of([&] { e.set_sequence(3); }).find("outside [0, 3)"), std::string::npos);
  EXPECT_NE(error_of([&] { e.position(-1); }).find("outside"), std::string::npos);
  // Context: sequence 1 at 6 of 8 positions; 3 steps are refused before anything runs.
  e.set_sequence(1);
  e.prefill(toks.data(), 3, nullptr);
  e.decode(5, nullptr);
  e.decode(5, nullptr);
  e.decode(5, nullptr);
  EXPECT_EQ(e.position(1), 6);
  EXPECT_NE(
      error_of([&] { e.generate_greedy_batch(toks.data(), 3, 3); }).find("exceeds max_context"),
      std::string::npos);
  EXPECT_EQ(e.position(0), 0);
  EXPECT_EQ(e.position(1), 6);
  e.decode_batch(toks.data(), 2, nullptr);
  e.decode_batch(toks.data(), 2, nullptr);
  EXPECT_NE(error_of([&] { e.decode_batch(toks.data(), 2, nullptr); }).find("past the KV cache"),
            std::string::npos);
  // An engine made for one sequence: n = 1 is decode() on sequence 0, more is refused.
  GpuEngine one(m, batch_opt(m, {"", false, true}, 1));
  std::vector<float> a, b;
  one.decode_batch(toks.data(), 1, &a);
  one.reset();
  one.decode(toks[0], &b);
  EXPECT_EQ(a, b);
  EXPECT_NE(error_of([&] { one.decode_batch(toks.data(), 2, nullptr); }).find("2 sequences"),
            std::string::npos);
  GpuEngineOptions bad = batch_opt(m, {"", false, true}, 0);
  EXPECT_NE(error_of([&] { GpuEngine x(m, bad); }).find("max_sequences 0"), std::string::npos);
}

TEST(GpuBatch, DeviceBytesWithinPlan) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  Budgets budgets;
  budgets.bytes["cuda:0"] = 80 * kGiB;
  for (bool hybrid : {false, true}) {
    Placement p =
        make_uniform_placement(m.cfg, Device::cuda(0), hybrid ? Device::cpu() : Device::cuda(0));
    p.runtime.context = 64;
    p.runtime.batch = 8;
    p.runtime.cuda_graph = false;
    const MemoryPlan plan = plan_memory(m, p, budgets);
    const DeviceUse& g = plan.per_device.at("cuda:0");
    GpuEngineOptions o = batch_opt(m, {"", hybrid, false}, 8);
    if (hybrid) o.expert_on_gpu = test::expert_map(m.cfg, test::Split::AllOnCpu);
    GpuEngine e(m, o);
    const int64_t planned = g.total - kGpuContextReserve;
    std::printf("[GpuBatch] %s, 8 sequences: engine %lld bytes, plan %lld (KV cache %lld)\n",
                hybrid ? "experts on cpu" : "all on gpu", static_cast<long long>(e.device_bytes()),
                static_cast<long long>(planned), static_cast<long long>(g.kv_cache));
    EXPECT_LE(e.device_bytes(), planned);
  }
}

}  // namespace
}  // namespace ktune
