// Concurrent sequences on the GPU engine (GpuEngine::Impl, engine/cuda/gpu_engine_impl.h; state
// in gpu_engine_batch.h).
//
// Each of the max_sequences sequences owns a region of every layer's KV cache (max_context
// positions) and a position. The single-sequence steps (decode, prefill, generate_greedy) run
// on the current sequence: set_sequence points every layer's cache at its region and its
// position into the device `pos` word (the captured single-step graph, which has the old cache
// addresses baked in, is dropped and captured again at the next step; the hand-off epoch is
// bumped so that steps of two sequences at one position never share a sequence number).
//
// A batched step decodes one token of each of sequences 0..B-1 like a prefill chunk of B tokens
// at B positions of B caches (kernels: prefill_kernels.h, batch_kernels.h):
//   embedding of the B tokens;
//   per layer: RMSNorm (fp16 out) -> q, k, v tensor-core matmuls (m = B: each weight read once
//   per step) -> decode attention with a batch dimension: row b normalizes and rotates its
//   q/k heads at pos[b], stores its k/v in sequence b's cache and attends over it -> fp16 ->
//   o matmul added to the residual -> ffn RMSNorm (f32 + fp16) -> router (f32) -> softmax
//   top-k of the B rows -> (token, slot) pairs grouped by expert -> per-expert gate/up matmul
//   with SwiGLU and down matmul (an expert read once for every token that chose it) -> per
//   token, x + (sum of its GPU experts in slot order) [+ its CPU experts' sum];
//   final norm + output head (m = B) + argmax per row on the device; history[b][pos[b]] =
//   token, ++pos[b], ++step.
// Positions live in device memory and every launch is sized by B alone, so the step is
// captured once per batch size (cuda_graph) and replayed; generate_greedy_batch runs its steps
// without the host in between. Rows never mix: sequence b's tokens and logits are the same
// whichever sequences share its steps (B = 1 included).
//
// Hybrid placements: per layer with CPU experts, after the router the B rows' normed states,
// ids and weights are copied into a mapped block and the request word raised (flags: a
// one-block kernel; host_node: a host node), exactly as the single-token hand-off
// (cpu_expert_driver.h) but for B tokens; the driver thread groups the B tokens' CPU experts by
// expert (CpuMoeBatch) while the GPU computes its experts; the GPU waits for the done word,
// copies the B sums in and the combine adds them after the GPU experts' sum: the single step's
// order. A batched step's sequence number is (epoch << 32) | step counter (from
// kBatchStepBase), read from device memory like the single step's position.
#include "cuda/gpu_engine_batch.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/cpu_expert_driver.h"
#include "cuda/gpu_engine_impl.h"
#include "cuda/gpu_pipeline.h"
#include "ktune/engine/cuda/batch_kernels.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/cuda/prefill_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/trace.h"

namespace ktune {

using gpu_detail::check_launch;

static_assert(cuda::kAttnChunk == kAttnDecodeChunk,
              "the memory planner sizes the batched attention workspace with the kernel's split");
static_assert(cuda::kPrefillTileM == kPrefillTileRows,
              "the memory planner sizes the tile list with the kernels' tile height");

BatchState::~BatchState() {
  for (auto& [n, g] : graphs) {
    if (g.exec) cudaGraphExecDestroy(g.exec);
    if (g.graph) cudaGraphDestroy(g.graph);
  }
  if (h_io) cudaFreeHost(h_io);
  if (mapped) cudaFreeHost(mapped);
}

void GpuEngine::Impl::batch_setup(const ModelWeights& w) {
  std::string why;
  if (hidden % 64 != 0 || nq % 64 != 0 || ffn % 64 != 0) {
    why = "matrix rows that are not a multiple of 64 elements";
  } else if (n_exp > 256 || top_k > 64) {
    why = "more than 256 experts or top-k above 64";
  } else if (vocab % 2 != 0) {
    why = "an odd vocabulary size (the output head's matmul writes pairs)";
  }
  for (int64_t l = 0; l < layers && why.empty(); ++l) {
    if (L[static_cast<size_t>(l)].router.type != QuantType::F32) why = "a non-F32 router";
  }
  if (!why.empty()) {
    throw Error("gpu engine",
                std::to_string(max_seq) +
                    " concurrent sequences need the batched kernels, which this model cannot "
                    "use (" +
                    why + ")",
                "decode one sequence at a time (max_sequences 1, --batch 1)");
  }
  batch_state = std::make_unique<BatchState>();
  BatchState& bs = *batch_state;
  const int64_t S = max_seq, P = S * top_k;
  bs.S = S;
  bs.arena = cuda::DeviceArena(static_cast<size_t>(batch_decode_workspace_bytes(cfg, S, max_ctx)),
                               "gpu engine batch workspace");
  auto fl = [&](int64_t n) { return bs.arena.alloc_n<float>(static_cast<size_t>(n)); };
  auto hf = [&](int64_t n) { return bs.arena.alloc_n<uint16_t>(static_cast<size_t>(n)); };
  auto in = [&](int64_t n) { return bs.arena.alloc_n<int32_t>(static_cast<size_t>(n)); };
  // The order and sizes of batch_decode_workspace_bytes (memory_plan.cpp).
  bs.io = in(2 * S);
  bs.tokens = bs.io;
  bs.pos = bs.io + S;
  bs.history = in(S * max_ctx);
  bs.step = in(1);
  bs.x = fl(S * hidden);
  bs.h16 = hf(S * hidden);
  bs.hn = fl(S * hidden);
  bs.qf = fl(S * nq);
  bs.kf = fl(S * nkv_rows);
  bs.vf = fl(S * nkv_rows);
  bs.attn = fl(S * nq);
  bs.a16 = hf(S * nq);
  bs.rlog = fl(S * n_exp);
  bs.ids = in(P);
  bs.wts = fl(P);
  bs.gpu_ids = in(P);
  bs.sorted_tok = in(P);
  bs.pair_pos = in(P);
  bs.max_tiles = cuda::prefill_moe_max_tiles(P, n_exp, cuda::kPrefillTileM);
  bs.tiles = in(4 * bs.max_tiles);
  bs.n_tiles = in(1);
  bs.act16 = hf(P * ffn);
  bs.ye = fl(P * hidden);
  bs.ycpu = fl(S * hidden);
  bs.logits = fl(S * vocab);
  bs.expert_table = bs.arena.alloc_n<const void*>(static_cast<size_t>(layers * 3 * n_exp));
  bs.all_cpu = in(n_exp);
  bs.attn_ws = bs.arena.alloc(
      std::max<size_t>(cuda::attention_decode_batch_workspace_bytes(S, n_heads, hd, max_ctx), 1));

  KTUNE_CUDA_CHECK(cudaMemset(bs.history, 0xff, static_cast<size_t>(S * max_ctx) * 4));
  KTUNE_CUDA_CHECK(cudaMemset(bs.io, 0, static_cast<size_t>(2 * S) * 4));
  KTUNE_CUDA_CHECK(cudaMemcpy(bs.step, &bs.host_step, 4, cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(cudaMemset(bs.all_cpu, 0xff, static_cast<size_t>(n_exp) * 4));
  // Per-expert matrix pointers: the GPU copy of each expert, null for the CPU experts (their
  // pairs never reach the grouped matmuls).
  std::vector<const void*> table(static_cast<size_t>(layers * 3 * n_exp), nullptr);
  for (int64_t l = lb; l < le; ++l) {
    const DevLayer& d = L[static_cast<size_t>(l)];
    if (d.n_gpu_experts == 0) continue;
    for (int64_t e = 0; e < n_exp; ++e) {
      const int64_t slot = d.host_slot.empty() ? e : d.host_slot[static_cast<size_t>(e)];
      if (slot < 0) continue;
      const void** row = table.data() + l * 3 * n_exp + e;
      row[0] = static_cast<const uint8_t*>(d.gate.data) + slot * d.gate.matrix_bytes;
      row[n_exp] = static_cast<const uint8_t*>(d.up.data) + slot * d.up.matrix_bytes;
      row[2 * n_exp] = static_cast<const uint8_t*>(d.down.data) + slot * d.down.matrix_bytes;
    }
  }
  KTUNE_CUDA_CHECK(cudaMemcpy(bs.expert_table, table.data(), table.size() * sizeof(void*),
                              cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(cudaMallocHost(&bs.h_io, static_cast<size_t>(2 * S) * 4));

  if (is_hybrid) {
    // [h: S x hidden][ids: S x top_k][wts: S x top_k][y: S x hidden], each 64-byte aligned.
    auto al = [](size_t b) { return (b + 63) / 64 * 64; };
    const size_t hb = al(static_cast<size_t>(S * hidden) * 4);
    const size_t kb = al(static_cast<size_t>(P) * 4);
    const size_t bytes = 2 * hb + 2 * kb;
    KTUNE_CUDA_CHECK(cudaHostAlloc(&bs.mapped, bytes, cudaHostAllocMapped));
    std::memset(bs.mapped, 0, bytes);
    bs.h_h = reinterpret_cast<float*>(bs.mapped);
    bs.h_ids = reinterpret_cast<int32_t*>(bs.mapped + hb);
    bs.h_wts = reinterpret_cast<float*>(bs.mapped + hb + kb);
    bs.h_y = reinterpret_cast<float*>(bs.mapped + hb + 2 * kb);
    bs.cpu_moe = std::make_unique<CpuMoeBatch>(w, *pool, S, top_k);
    CpuExpertDriver::BatchShared sh{bs.h_h, bs.h_ids, bs.h_wts, bs.h_y, hidden, S};
    driver->enable_batch(sh, bs.cpu_moe.get());
  }
}

uint64_t GpuEngine::Impl::batch_seq() const {
  return (static_cast<uint64_t>(host_epoch) << 32) | batch_state->host_step;
}

// One batched step of sequences 0..n-1 (tokens and positions in bs.io).
void GpuEngine::Impl::enqueue_batch_step(int64_t n) {
  BatchState& bs = *batch_state;
  cudaStream_t s = stream;
  const float eps = cfg.rms_eps;
  check_launch(
      cuda::launch_embedding(tok_embd.type, tok_embd.data, vocab, hidden, bs.tokens, n, bs.x, s),
      "launch_embedding (batch)");
  for (int64_t l = lb; l < le; ++l) {
    const DevLayer& d = L[static_cast<size_t>(l)];
    const int32_t layer = static_cast<int32_t>(l);
    {
      trace::Scope attention(trace::Phase::Attention, layer);
      rows_qkv(d, bs, n, " (batch)");
      check_launch(cuda::launch_attention_decode_qknorm_rope_batch(
                       bs.qf, bs.kf, bs.vf, static_cast<const float*>(d.q_norm.data),
                       static_cast<const float*>(d.k_norm.data), eps, inv_freq, d.k_seq0, d.v_seq0,
                       kv_seq_elems, bs.pos, n, n_heads, n_kv, hd, max_ctx, bs.attn_ws, bs.attn, s),
                   "launch_attention_decode_qknorm_rope_batch");
      check_launch(cuda::launch_f32_to_f16(bs.attn, n * nq, bs.a16, s), "launch_f32_to_f16");
      rows_matmul(d.wo, n, bs.a16, bs.x, true, "launch_prefill_matmul o", " (batch)");
    }
    {
      trace::Scope routing(trace::Phase::Router, layer);
      rows_router(d, bs, n, " (batch)");
    }
    batch_moe(d, l, n);
  }
  trace::Scope sampling(trace::Phase::Sampling);
  check_launch(cuda::launch_prefill_rmsnorm(bs.x, static_cast<const float*>(output_norm.data), eps,
                                            n, hidden, nullptr, bs.h16, s),
               "launch_prefill_rmsnorm output (batch)");
  rows_matmul(output, n, bs.h16, bs.logits, false, "launch_prefill_matmul output", " (batch)");
  check_launch(cuda::launch_argmax(bs.logits, n, vocab, bs.tokens, s), "launch_argmax (batch)");
  check_launch(cuda::launch_batch_advance(bs.tokens, bs.pos, bs.history, max_ctx, n, bs.step, s),
               "launch_batch_advance");
}

// The MoE of layer l for the n rows: GPU experts grouped by expert, CPU experts through the
// driver (hybrid), then the combine.
void GpuEngine::Impl::batch_moe(const DevLayer& d, int64_t l, int64_t n) {
  BatchState& bs = *batch_state;
  cudaStream_t s = stream;
  const bool cpu = d.n_cpu_experts > 0;
  const bool gpu = d.n_gpu_experts > 0;
  const int64_t pairs = n * top_k;
  const int32_t* slot_map = cpu ? (d.slot_map ? d.slot_map : bs.all_cpu) : nullptr;
  if (cpu) {
    trace::Scope transfer(trace::Phase::Transfer, static_cast<int32_t>(l));
    const size_t hb = static_cast<size_t>(n * hidden) * 4, kb = static_cast<size_t>(pairs) * 4;
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(bs.h_h, bs.hn, hb, cudaMemcpyDeviceToHost, s));
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(bs.h_ids, bs.ids, kb, cudaMemcpyDeviceToHost, s));
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(bs.h_wts, bs.wts, kb, cudaMemcpyDeviceToHost, s));
    if (opt.cpu_handoff == CpuHandoff::Flags) {
      // Nothing left to copy: the kernel only publishes the request word after the copies.
      check_launch(
          cuda::launch_handoff_signal(bs.hn, 0, d_stage_mapped, bs.step, epoch, d_words + l, s),
          "launch_handoff_signal (batch)");
    } else {
      KTUNE_CUDA_CHECK(
          cudaLaunchHostFunc(s, &CpuExpertDriver::host_post, driver->host_node_ctx(l)));
    }
    if (gpu) {
      check_launch(cuda::launch_batch_gpu_ids(bs.ids, pairs, slot_map, n_exp, bs.gpu_ids, s),
                   "launch_batch_gpu_ids");
    }
  }
  if (gpu) {
    trace::Scope gpu_experts(trace::Phase::MoeGpu, static_cast<int32_t>(l));
    check_launch(cuda::launch_prefill_moe_route(cpu ? bs.gpu_ids : bs.ids, n, top_k, n_exp,
                                                cuda::kPrefillTileM, bs.sorted_tok, bs.pair_pos,
                                                bs.tiles, bs.n_tiles, nullptr, s),
                 "launch_prefill_moe_route (batch)");
    rows_experts(d, bs, l, n, " (batch)");
  }
  if (cpu) {
    trace::Scope transfer(trace::Phase::Transfer, static_cast<int32_t>(l));
    if (opt.cpu_handoff == CpuHandoff::HostNode) {
      KTUNE_CUDA_CHECK(
          cudaLaunchHostFunc(s, &CpuExpertDriver::host_wait, driver->host_node_ctx(l)));
    }
    const uint64_t timeout_ns = static_cast<uint64_t>(opt.handoff_timeout_ms) * 1000000u;
    // Waits for the done word only (n = 0): the sums come over with one copy below.
    check_launch(
        cuda::launch_handoff_wait_add(d_words + l, d_ycpu_mapped, bs.step, epoch, d_error,
                                      CpuExpertDriver::kErrorTimeoutBase + static_cast<uint32_t>(l),
                                      timeout_ns, bs.x, 0, s),
        "launch_handoff_wait_add (batch)");
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(bs.ycpu, bs.h_y, static_cast<size_t>(n * hidden) * 4,
                                     cudaMemcpyHostToDevice, s));
  }
  check_launch(
      cuda::launch_batch_moe_combine(bs.ye, bs.pair_pos, bs.ids, bs.wts, slot_map,
                                     cpu ? bs.ycpu : nullptr, n, top_k, n_exp, hidden, bs.x, s),
      "launch_batch_moe_combine");
}

void GpuEngine::Impl::launch_batch_step(int64_t n) {
  BatchState& bs = *batch_state;
  if (!opt.cuda_graph) {
    enqueue_batch_step(n);
    return;
  }
  BatchState::Graph& g = bs.graphs[n];
  if (g.exec == nullptr) {
    KTUNE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    trace::GraphCapture capture(stream);  // tags nodes with layer and phase (as launch_step)
    try {
      enqueue_batch_step(n);
    } catch (...) {
      cudaGraph_t broken = nullptr;
      cudaStreamEndCapture(stream, &broken);
      if (broken) cudaGraphDestroy(broken);
      throw;
    }
    KTUNE_CUDA_CHECK(cudaStreamEndCapture(stream, &g.graph));
    capture.finish(g.graph);
    KTUNE_CUDA_CHECK(cudaGraphInstantiate(&g.exec, g.graph, 0));
  }
  KTUNE_CUDA_CHECK(cudaGraphLaunch(g.exec, stream));
}

void GpuEngine::Impl::run_batch_step(int64_t n) {
  for (int64_t b = 0; b < n; ++b) {
    if (seq_position(b) >= max_ctx) {
      throw Error("gpu engine",
                  "sequence " + std::to_string(b) + " is at position " +
                      std::to_string(seq_position(b)) + ", past the KV cache (" +
                      std::to_string(max_ctx) + " positions)",
                  "raise max_context or reset()");
    }
  }
  trace::Scope step(trace::Phase::DecodeStep, static_cast<int32_t>(n));
  const bool arm = driver != nullptr && is_hybrid;
  if (arm) driver->arm(batch_seq(), n);
  try {
    launch_batch_step(n);
  } catch (...) {
    if (arm) driver->cancel();
    throw;
  }
  ++batch_state->host_step;
  for (int64_t b = 0; b < n; ++b) ++seq_position(b);
  if (cur_seq < n) single_pos_stale = true;
}

void GpuEngine::Impl::batch_upload(const int32_t* toks, int64_t n) {
  BatchState& bs = *batch_state;
  for (int64_t b = 0; b < n; ++b) {
    if (toks[b] < 0 || toks[b] >= vocab) {
      throw Error("decode_batch",
                  "token " + std::to_string(toks[b]) + " of sequence " + std::to_string(b) +
                      " is outside the vocabulary (" + std::to_string(vocab) + ")",
                  "pass token ids of the model");
    }
  }
  sync();  // h_io may still be read by the previous upload
  for (int64_t b = 0; b < bs.S; ++b) {
    bs.h_io[b] = b < n ? toks[b] : 0;
    bs.h_io[bs.S + b] = static_cast<int32_t>(seq_position(b));
  }
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(bs.io, bs.h_io, static_cast<size_t>(2 * bs.S) * 4,
                                   cudaMemcpyHostToDevice, stream));
}

void GpuEngine::Impl::select_sequence(int64_t s) {
  if (s == cur_seq) return;
  sync();
  seq_pos[static_cast<size_t>(cur_seq)] = host_pos;
  cur_seq = s;
  host_pos = seq_pos[static_cast<size_t>(s)];
  for (int64_t l = lb; l < le; ++l) {
    DevLayer& d = L[static_cast<size_t>(l)];
    d.k_cache = d.k_seq0 + s * kv_seq_elems;
    d.v_cache = d.v_seq0 + s * kv_seq_elems;
  }
  // The captured single step reads the previous sequence's caches: capture it again.
  if (graph_exec) cudaGraphExecDestroy(graph_exec);
  if (graph) cudaGraphDestroy(graph);
  graph_exec = nullptr;
  graph = nullptr;
  // A new hand-off epoch: this sequence's steps may repeat positions the other one used.
  ++host_epoch;
  KTUNE_CUDA_CHECK(
      cudaMemcpyAsync(epoch, &host_epoch, sizeof(uint32_t), cudaMemcpyHostToDevice, stream));
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(stream));
  single_pos_stale = true;
}

// ---- public API ----

// One sequence where there is no Impl: the layer-split pipeline and the deepseek2 engine.
int64_t GpuEngine::max_sequences() const { return impl_ ? impl_->max_seq : 1; }

int64_t GpuEngine::sequence() const { return impl_ ? impl_->cur_seq : 0; }

void GpuEngine::set_sequence(int64_t seq) {
  if (seq < 0 || seq >= max_sequences()) {
    throw Error("sequence " + std::to_string(seq),
                "outside [0, " + std::to_string(max_sequences()) + ")",
                "create the engine with more max_sequences");
  }
  if (!impl_) return;
  impl_->select_sequence(seq);
}

int64_t GpuEngine::position(int64_t seq) const {
  if (seq < 0 || seq >= max_sequences()) {
    throw Error("sequence " + std::to_string(seq),
                "outside [0, " + std::to_string(max_sequences()) + ")",
                "create the engine with more max_sequences");
  }
  if (!impl_) return position();
  return static_cast<const Impl&>(*impl_).seq_position(seq);
}

namespace {

void check_batch(int64_t n, int64_t max_seq, const void* tokens, const char* where) {
  if (n < 1 || n > max_seq) {
    throw Error(where,
                std::to_string(n) + " sequences, but the engine has " + std::to_string(max_seq),
                "create the engine with max_sequences >= the batch");
  }
  if (tokens == nullptr) {
    throw Error(where, "no tokens given", "pass one token per sequence", ErrorKind::Usage);
  }
}

}  // namespace

void GpuEngine::decode_batch(const int32_t* tokens, int64_t n, std::vector<float>* logits) {
  if (!impl_ || !impl_->batch_state) {
    check_batch(n, 1, tokens, "decode_batch");
    set_sequence(0);
    return decode(tokens[0], logits);
  }
  Impl& m = *impl_;
  check_batch(n, m.max_seq, tokens, "decode_batch");
  m.batch_upload(tokens, n);
  m.run_batch_step(n);
  if (logits) {
    logits->resize(static_cast<size_t>(n * m.vocab));
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(logits->data(), m.batch_state->logits,
                                     static_cast<size_t>(n * m.vocab) * sizeof(float),
                                     cudaMemcpyDeviceToHost, m.stream));
  }
  m.sync();
}

std::vector<int32_t> GpuEngine::generate_greedy_batch(const int32_t* first_tokens, int64_t n,
                                                      int64_t steps) {
  if (!impl_ || !impl_->batch_state) {
    check_batch(n, 1, first_tokens, "generate_greedy_batch");
    set_sequence(0);
    return generate_greedy(first_tokens[0], steps);
  }
  Impl& m = *impl_;
  check_batch(n, m.max_seq, first_tokens, "generate_greedy_batch");
  if (steps <= 0) return {};
  std::vector<int64_t> p0(static_cast<size_t>(n));
  for (int64_t b = 0; b < n; ++b) {
    p0[static_cast<size_t>(b)] = m.seq_position(b);
    if (m.seq_position(b) + steps > m.max_ctx) {
      throw Error("gpu engine",
                  "generating " + std::to_string(steps) + " tokens for sequence " +
                      std::to_string(b) + " at position " + std::to_string(m.seq_position(b)) +
                      " exceeds max_context " + std::to_string(m.max_ctx),
                  "raise max_context or reset()");
    }
  }
  m.batch_upload(first_tokens, n);
  for (int64_t i = 0; i < steps; ++i) m.run_batch_step(n);
  std::vector<int32_t> out(static_cast<size_t>(n * steps));
  for (int64_t b = 0; b < n; ++b) {
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(
        out.data() + b * steps, m.batch_state->history + b * m.max_ctx + p0[static_cast<size_t>(b)],
        static_cast<size_t>(steps) * 4, cudaMemcpyDeviceToHost, m.stream));
  }
  m.sync();
  return out;
}

}  // namespace ktune
