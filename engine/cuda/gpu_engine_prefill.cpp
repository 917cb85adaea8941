// Batched prefill (GpuEngine::Impl, engine/cuda/gpu_engine_impl.h; state in gpu_engine_prefill.h).
//
// A prompt runs in chunks of up to GpuEngineOptions::max_prefill_chunk tokens. Per chunk of T
// tokens at positions pos0 .. pos0 + T - 1 (kernels: include/ktune/engine/cuda/prefill_kernels.h):
//   embedding of the T tokens;
//   per layer: RMSNorm (fp16 out) -> q, k, v matmuls (tensor cores) -> q/k head norms + RoPE,
//   keys and values stored into the fp16 cache at their positions -> causal attention over the
//   cache -> o matmul added to the residual -> ffn RMSNorm (f32 + fp16) -> router (f32) ->
//   softmax top-k for all T tokens -> (token, slot) pairs grouped by expert (stable counting
//   sort) -> per-expert gate/up matmul with SwiGLU -> per-expert down matmul -> per-token
//   weighted sum in slot order + residual;
//   after the last chunk only: final norm + output head + argmax for the last token, the
//   position and the sampled token left on the device as a decode step leaves them (pos =
//   pos0 + T, token = argmax, history[pos0 + T - 1] = token), logits copied when asked.
// Nothing synchronises inside a chunk; prefill() synchronises once at the end.
//
// Hybrid placements (experts on the CPU): a chunk of at least min_staged tokens copies each
// layer's CPU-resident experts into a device staging buffer and computes them with the same
// kernels as the resident ones, so the result is bit-identical to the all-GPU engine's prefill.
// Two staging buffers alternate between the staged layers: the copy of staged layer i + 1 (on a
// second stream, from page-locked host memory) runs while layer i computes; a layer's expert
// matmuls wait for its copy (event copied[b]) and the copy into a buffer waits until the
// previous layer using it is done (event freed[b]). Every routed-to expert's matrices are copied
// whole: at 32+ tokens with top-8 of 128 experts, near-uniform routing touches >= 87% of the
// experts (1 - (15/16)^32), and copying only those would need the routing before the copy,
// which would serialise the copy behind the layer's own attention instead of overlapping it
// with the previous layer. Shorter chunks run as decode steps (CpuMoe per token): copying a
// layer's experts costs the same whatever the chunk, so below hybrid_prefill_min_staged()
// tokens (memory_plan.h: the copy's time against n decode steps' CPU reads; ~28 tokens for
// qwen3-30b-a3b with half or all of its experts on the CPU) the decode steps win.
// The host expert tensors are registered (cudaHostRegister) once at construction; if that
// fails (or KTUNE_PREFILL_PIN=0), copies go through two pinned bounce buffers.
//
// Knobs read at construction: KTUNE_PREFILL=0 (prefill as decode steps),
// KTUNE_PREFILL_MIN_STAGED=N (hybrid threshold), KTUNE_PREFILL_PIN=0 (bounce buffers),
// KTUNE_PREFILL_PROFILE=1 (per-phase GPU times of each prefill on stderr).
#include "cuda/gpu_engine_prefill.h"

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "cuda/gpu_engine_deepseek.h"
#include "cuda/gpu_engine_impl.h"
#include "cuda/gpu_pipeline.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/cuda/prefill_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/trace.h"

namespace ktune {

using gpu_detail::align_up;
using gpu_detail::check_launch;

static_assert(cuda::kPrefillTileM == kPrefillTileRows,
              "the memory planner sizes the tile list with the kernels' tile height");

namespace {

constexpr int64_t kMaxPrefillChunk = 16384;

int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0' || x < 0) {
    throw Error(name, std::string("`") + v + "` is not a non-negative integer",
                std::string("set ") + name + " to a number of tokens, or unset it",
                ErrorKind::Usage);
  }
  return x;
}

bool env_flag(const char* name, bool dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  return v[0] != '0';
}

// Copies the i-th staged layer's CPU experts into staging[i % 2] on the copy stream, after the
// layer that used that buffer last is done with it.
void issue_stage_copy(PrefillState& ps, size_t i) {
  if (i >= ps.staged.size()) return;
  const int b = static_cast<int>(i % 2);
  cudaStream_t cs = *ps.copy_stream;
  KTUNE_CUDA_CHECK(cudaStreamWaitEvent(cs, *ps.freed[b], 0));
  if (ps.profile) ps.ev_copy[2 * i]->record(cs);
  for (const PrefillState::CopyRun& r : ps.staged[i].runs) {
    uint8_t* dst = ps.staging[b] + r.dst_offset;
    if (ps.pinned) {
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, r.src, r.bytes, cudaMemcpyHostToDevice, cs));
      continue;
    }
    for (size_t done = 0; done < r.bytes;) {
      const size_t piece = std::min(PrefillState::kBounceBytes, r.bytes - done);
      const int j = ps.bounce_next;
      ps.bounce_next ^= 1;
      ps.bounce_free[j]->synchronize();  // its previous copy has left the bounce buffer
      std::memcpy(ps.bounce[j], r.src + done, piece);
      KTUNE_CUDA_CHECK(
          cudaMemcpyAsync(dst + done, ps.bounce[j], piece, cudaMemcpyHostToDevice, cs));
      ps.bounce_free[j]->record(cs);
      done += piece;
    }
  }
  ps.copied[b]->record(cs);
  if (ps.profile) ps.ev_copy[2 * i + 1]->record(cs);
}

}  // namespace

PrefillState::~PrefillState() {
  if (copy_stream) cudaStreamSynchronize(*copy_stream);
  for (void* p : registered) cudaHostUnregister(p);
  for (uint8_t* b : bounce) {
    if (b) cudaFreeHost(b);
  }
  if (h_tokens) cudaFreeHost(h_tokens);
}

void GpuEngine::Impl::prefill_setup(const ModelWeights& w) {
  prefill_state = std::make_unique<PrefillState>();
  PrefillState& ps = *prefill_state;
  if (opt.max_prefill_chunk < 1 || opt.max_prefill_chunk > kMaxPrefillChunk) {
    throw Error("gpu engine",
                "max_prefill_chunk " + std::to_string(opt.max_prefill_chunk) + " out of range",
                "use 1.." + std::to_string(kMaxPrefillChunk), ErrorKind::Usage);
  }
  ps.chunk = std::min(opt.max_prefill_chunk, max_ctx);
  if (!env_flag("KTUNE_PREFILL", true)) {
    ps.reason = "KTUNE_PREFILL=0";
  } else if (hd != 64 && hd != 128) {
    ps.reason = "head_dim " + std::to_string(hd) + " (the prefill attention takes 64 or 128)";
  } else if (hidden % 64 != 0 || nq % 64 != 0 || ffn % 64 != 0) {
    ps.reason = "matrix rows that are not a multiple of 64 elements";
  } else if (n_exp > 256 || top_k > 64) {
    ps.reason = "more than 256 experts or top-k above 64";
  }
  for (int64_t l = 0; l < layers && ps.reason.empty(); ++l) {
    if (L[static_cast<size_t>(l)].router.type != QuantType::F32) ps.reason = "a non-F32 router";
  }
  ps.enabled = ps.reason.empty();
  if (!ps.enabled) return;
  ps.profile = env_flag("KTUNE_PREFILL_PROFILE", false);

  // Staging plan: per layer with CPU experts, the copies of runs of consecutive CPU expert ids
  // into [gate of its CPU experts][up ...][down ...], in id order.
  ps.staged_of.assign(static_cast<size_t>(layers), -1);
  size_t largest = 0;
  double copy_bytes = 0, cpu_bytes_per_token = 0;  // per chunk / per decode step, all layers
  if (is_hybrid) {
    for (int64_t l = 0; l < layers; ++l) {
      const DevLayer& d = L[static_cast<size_t>(l)];
      if (d.n_cpu_experts == 0) continue;
      const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
      const size_t gb = static_cast<size_t>(d.gate.matrix_bytes);
      const size_t ub = static_cast<size_t>(d.up.matrix_bytes);
      const size_t db = static_cast<size_t>(d.down.matrix_bytes);
      const size_t ncpu = static_cast<size_t>(d.n_cpu_experts);
      PrefillState::StagedLayer sl;
      sl.layer = l;
      size_t idx = 0;
      for (int64_t e = 0; e < n_exp;) {
        if (d.host_slot[static_cast<size_t>(e)] >= 0) {
          ++e;
          continue;
        }
        int64_t e1 = e;
        while (e1 < n_exp && d.host_slot[static_cast<size_t>(e1)] < 0) ++e1;
        const size_t cnt = static_cast<size_t>(e1 - e);
        sl.runs.push_back({idx * gb, lw.gate_exps.matrix(e), cnt * gb});
        sl.runs.push_back({ncpu * gb + idx * ub, lw.up_exps.matrix(e), cnt * ub});
        sl.runs.push_back({ncpu * (gb + ub) + idx * db, lw.down_exps.matrix(e), cnt * db});
        idx += cnt;
        e = e1;
      }
      ps.staged_of[static_cast<size_t>(l)] = static_cast<int64_t>(ps.staged.size());
      ps.staged.push_back(std::move(sl));
      largest = std::max(largest, ncpu * (gb + ub + db));
      copy_bytes += static_cast<double>(ncpu * (gb + ub + db));
      cpu_bytes_per_token += static_cast<double>(top_k) * static_cast<double>(ncpu) /
                             static_cast<double>(n_exp) * static_cast<double>(gb + ub + db);
    }
  }
  // Staged chunks from the length where copying the CPU experts beats reading them in decode
  // steps (memory_plan.h); KTUNE_PREFILL_MIN_STAGED overrides.
  ps.min_staged = std::max<int64_t>(
      1, env_int("KTUNE_PREFILL_MIN_STAGED",
                 hybrid_prefill_min_staged(copy_bytes, cpu_bytes_per_token)));

  // Device memory: the workspace the planner counts, plus two staging buffers when the device
  // has room for them (without them hybrid prefill runs as decode steps).
  const size_t ws = static_cast<size_t>(prefill_workspace_bytes(cfg, ps.chunk));
  ps.staging_bytes = align_up(largest);
  if (largest > 0) {
    try {
      ps.arena = cuda::DeviceArena(ws + 2 * ps.staging_bytes, "gpu engine prefill workspace");
      ps.staging_ok = true;
    } catch (const Error&) {
      cudaGetLastError();  // the failed cudaMalloc
      ps.arena = cuda::DeviceArena(ws, "gpu engine prefill workspace");
    }
  } else {
    ps.arena = cuda::DeviceArena(ws, "gpu engine prefill workspace");
  }
  const int64_t T = ps.chunk, P = T * top_k;
  auto fl = [&](int64_t n) { return ps.arena.alloc_n<float>(static_cast<size_t>(n)); };
  auto hf = [&](int64_t n) { return ps.arena.alloc_n<uint16_t>(static_cast<size_t>(n)); };
  auto in = [&](int64_t n) { return ps.arena.alloc_n<int32_t>(static_cast<size_t>(n)); };
  ps.tokens = in(T);
  ps.x = fl(T * hidden);
  ps.h16 = hf(T * hidden);
  ps.hn = fl(T * hidden);
  ps.qf = fl(T * nq);
  ps.kf = fl(T * nkv_rows);
  ps.vf = fl(T * nkv_rows);
  ps.q16 = hf(T * nq);
  ps.a16 = hf(T * nq);
  ps.rlog = fl(T * n_exp);
  ps.ids = in(P);
  ps.wts = fl(P);
  ps.sorted_tok = in(P);
  ps.pair_pos = in(P);
  ps.max_tiles = cuda::prefill_moe_max_tiles(P, n_exp, cuda::kPrefillTileM);
  ps.tiles = in(4 * ps.max_tiles);
  ps.n_tiles = in(1);
  ps.act16 = hf(P * ffn);
  ps.ye = fl(P * hidden);
  ps.expert_table = ps.arena.alloc_n<const void*>(static_cast<size_t>(layers * 3 * n_exp));
  if (ps.staging_ok) {
    ps.staging[0] = static_cast<uint8_t*>(ps.arena.alloc(ps.staging_bytes));
    ps.staging[1] = static_cast<uint8_t*>(ps.arena.alloc(ps.staging_bytes));
  }

  // Per-expert matrix pointers: the resident copy, or the expert's place in its layer's staging
  // buffer (null when there is no staging: those layers then never run batched).
  std::vector<const void*> table(static_cast<size_t>(layers * 3 * n_exp), nullptr);
  for (int64_t l = 0; l < layers; ++l) {
    const DevLayer& d = L[static_cast<size_t>(l)];
    const int64_t si = ps.staged_of[static_cast<size_t>(l)];
    const uint8_t* base = si >= 0 && ps.staging_ok ? ps.staging[si % 2] : nullptr;
    const int64_t gb = d.gate.matrix_bytes, ub = d.up.matrix_bytes, db = d.down.matrix_bytes;
    int64_t idx = 0;
    for (int64_t e = 0; e < n_exp; ++e) {
      const int64_t slot = d.host_slot.empty() ? e : d.host_slot[static_cast<size_t>(e)];
      const void** row = table.data() + l * 3 * n_exp + e;
      if (slot >= 0) {
        row[0] = static_cast<const uint8_t*>(d.gate.data) + slot * gb;
        row[n_exp] = static_cast<const uint8_t*>(d.up.data) + slot * ub;
        row[2 * n_exp] = static_cast<const uint8_t*>(d.down.data) + slot * db;
      } else {
        const int64_t n_cpu = d.n_cpu_experts;
        if (base) {
          row[0] = base + idx * gb;
          row[n_exp] = base + n_cpu * gb + idx * ub;
          row[2 * n_exp] = base + n_cpu * (gb + ub) + idx * db;
        }
        ++idx;
      }
    }
  }
  KTUNE_CUDA_CHECK(cudaMemcpy(ps.expert_table, table.data(), table.size() * sizeof(void*),
                              cudaMemcpyHostToDevice));

  KTUNE_CUDA_CHECK(cudaMallocHost(&ps.h_tokens, static_cast<size_t>(T + 1) * sizeof(int32_t)));
  ps.tokens_copied = std::make_unique<cuda::Event>(false);

  if (ps.staging_ok) {
    ps.copy_stream = std::make_unique<cuda::Stream>();
    for (int b = 0; b < 2; ++b) {
      ps.copied[b] = std::make_unique<cuda::Event>(false);
      ps.freed[b] = std::make_unique<cuda::Event>(false);
    }
    // Page-lock the host expert tensors of the staged layers (whole tensors, page-rounded,
    // merged where they touch), so the copies run at full PCIe speed.
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
    for (const PrefillState::StagedLayer& sl : ps.staged) {
      const LayerWeights& lw = w.layers[static_cast<size_t>(sl.layer)];
      for (const TensorView* t : {&lw.gate_exps, &lw.up_exps, &lw.down_exps}) {
        const uintptr_t b = reinterpret_cast<uintptr_t>(t->data) / page * page;
        const uintptr_t e = (reinterpret_cast<uintptr_t>(t->data) +
                             static_cast<uintptr_t>(t->nbytes()) + page - 1) /
                            page * page;
        ranges.emplace_back(b, e);
      }
    }
    std::sort(ranges.begin(), ranges.end());
    std::vector<std::pair<uintptr_t, uintptr_t>> merged;
    for (const auto& r : ranges) {
      if (!merged.empty() && r.first <= merged.back().second) {
        merged.back().second = std::max(merged.back().second, r.second);
      } else {
        merged.push_back(r);
      }
    }
    ps.pinned = env_flag("KTUNE_PREFILL_PIN", true);
    for (const auto& [b, e] : merged) {
      if (!ps.pinned) break;
      void* p = reinterpret_cast<void*>(b);
      const size_t len = e - b;
      cudaError_t err = cudaHostRegister(p, len, cudaHostRegisterDefault);
      if (err == cudaErrorHostMemoryAlreadyRegistered) {
        // Another engine on the same weights registered it: copies stay correct (from pageable
        // memory they are only slower) should it unregister first.
        cudaGetLastError();
        continue;
      }
      if (err != cudaSuccess) {  // e.g. a read-only file mapping
        cudaGetLastError();
        err = cudaHostRegister(p, len, cudaHostRegisterReadOnly);
      }
      if (err == cudaSuccess) {
        ps.registered.push_back(p);
      } else {
        cudaGetLastError();
        ps.pinned = false;
      }
    }
    if (!ps.pinned) {
      for (int b = 0; b < 2; ++b) {
        KTUNE_CUDA_CHECK(cudaMallocHost(&ps.bounce[b], PrefillState::kBounceBytes));
        ps.bounce_free[b] = std::make_unique<cuda::Event>(false);
      }
    }
  }

  if (ps.profile) {
    for (int64_t i = 0; i < 4 * layers; ++i) ps.ev_layer.push_back(std::make_unique<cuda::Event>());
    for (size_t i = 0; i < 2 * ps.staged.size(); ++i) {
      ps.ev_copy.push_back(std::make_unique<cuda::Event>());
    }
    ps.ev_begin = std::make_unique<cuda::Event>();
    ps.ev_end = std::make_unique<cuda::Event>();
  }
}

// One layer of a chunk of n tokens at positions pos0...; `stage`: this chunk computes the CPU
// experts on the GPU from staging.
void GpuEngine::Impl::prefill_layer(int64_t l, int64_t n, int64_t pos0, bool stage) {
  PrefillState& ps = *prefill_state;
  const DevLayer& d = L[static_cast<size_t>(l)];
  cudaStream_t s = stream;
  const float eps = cfg.rms_eps;
  if (ps.profile) ps.ev_layer[4 * l]->record(s);

  rows_qkv(d, ps, n, "");
  check_launch(cuda::launch_prefill_qk_norm_rope(
                   ps.qf, ps.kf, ps.vf, static_cast<const float*>(d.q_norm.data),
                   static_cast<const float*>(d.k_norm.data), eps, inv_freq, n, pos0, n_heads, n_kv,
                   hd, max_ctx, ps.q16, d.k_cache, d.v_cache, s),
               "launch_prefill_qk_norm_rope");
  check_launch(cuda::launch_prefill_attention(ps.q16, d.k_cache, d.v_cache, n, pos0, n_heads, n_kv,
                                              hd, max_ctx, ps.a16, s),
               "launch_prefill_attention");
  rows_matmul(d.wo, n, ps.a16, ps.x, true, "launch_prefill_matmul o", "");
  if (ps.profile) ps.ev_layer[4 * l + 1]->record(s);

  rows_router(d, ps, n, "");
  check_launch(
      cuda::launch_prefill_moe_route(ps.ids, n, top_k, n_exp, cuda::kPrefillTileM, ps.sorted_tok,
                                     ps.pair_pos, ps.tiles, ps.n_tiles, nullptr, s),
      "launch_prefill_moe_route");
  if (ps.profile) ps.ev_layer[4 * l + 2]->record(s);

  const int64_t si = ps.staged_of.empty() ? -1 : ps.staged_of[static_cast<size_t>(l)];
  const bool staged = stage && si >= 0;
  if (staged) KTUNE_CUDA_CHECK(cudaStreamWaitEvent(s, *ps.copied[si % 2], 0));
  rows_experts(d, ps, l, n, "");
  if (staged) {
    ps.freed[si % 2]->record(s);
    issue_stage_copy(ps, static_cast<size_t>(si) + 2);
  }
  check_launch(
      cuda::launch_prefill_moe_combine(ps.ye, ps.pair_pos, ps.wts, n, top_k, hidden, ps.x, s),
      "launch_prefill_moe_combine");
  if (ps.profile) ps.ev_layer[4 * l + 3]->record(s);
}

void GpuEngine::Impl::prefill_chunk(const int32_t* toks, int64_t n, bool last,
                                    std::vector<float>* out_logits) {
  PrefillState& ps = *prefill_state;
  cudaStream_t s = stream;
  const int64_t pos0 = host_pos;
  const bool stage = is_hybrid;     // prefill() runs hybrid chunks here only with staging
  ps.tokens_copied->synchronize();  // the pinned slots are free again
  std::memcpy(ps.h_tokens, toks, static_cast<size_t>(n) * sizeof(int32_t));
  // The device position as a decode step leaves it: after the last chunk decode_advance below
  // moves it from pos0 + n - 1 to pos0 + n.
  // A pipeline stage without the head has no decode_advance: its position goes to pos0 + n.
  ps.h_tokens[ps.chunk] = static_cast<int32_t>(last && spec.head ? pos0 + n - 1 : pos0 + n);
  if (ps.profile) ps.ev_begin->record(s);
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(ps.tokens, ps.h_tokens, static_cast<size_t>(n) * 4,
                                   cudaMemcpyHostToDevice, s));
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(pos, ps.h_tokens + ps.chunk, 4, cudaMemcpyHostToDevice, s));
  ps.tokens_copied->record(s);
  if (stage) {
    issue_stage_copy(ps, 0);
    issue_stage_copy(ps, 1);
  }
  if (spec.embedding) {  // later pipeline stages receive ps.x from the previous GPU
    check_launch(
        cuda::launch_embedding(tok_embd.type, tok_embd.data, vocab, hidden, ps.tokens, n, ps.x, s),
        "launch_embedding prefill");
  }
  for (int64_t l = lb; l < le; ++l) prefill_layer(l, n, pos0, stage);
  if (last && spec.head) {
    cuda::MatvecFused head;
    head.type = output.type;
    head.cols = hidden;
    head.x = ps.x + (n - 1) * hidden;
    head.norm_w = static_cast<const float*>(output_norm.data);
    head.eps = cfg.rms_eps;
    head.seg[0] = {output.data, logits, vocab};
    check_launch(cuda::launch_matvec_fused(head, s), "launch_matvec_fused output (prefill)");
    check_launch(cuda::launch_argmax(logits, 1, vocab, token, s), "launch_argmax (prefill)");
    check_launch(cuda::launch_decode_advance(pos, token, history, max_ctx, s),
                 "launch_decode_advance (prefill)");
    if (out_logits) {
      out_logits->resize(static_cast<size_t>(vocab));
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(out_logits->data(), logits,
                                       static_cast<size_t>(vocab) * sizeof(float),
                                       cudaMemcpyDeviceToHost, s));
    }
  }
  if (ps.profile) ps.ev_end->record(s);
  host_pos += n;
  if (ps.profile) {
    KTUNE_CUDA_CHECK(cudaStreamSynchronize(s));
    float attn = 0, route = 0, moe = 0, copy = 0;
    for (int64_t l = lb; l < le; ++l) {
      attn += ps.ev_layer[4 * l + 1]->elapsed_ms_since(*ps.ev_layer[4 * l]);
      route += ps.ev_layer[4 * l + 2]->elapsed_ms_since(*ps.ev_layer[4 * l + 1]);
      moe += ps.ev_layer[4 * l + 3]->elapsed_ms_since(*ps.ev_layer[4 * l + 2]);
    }
    double bytes = 0;
    if (stage) {
      for (size_t i = 0; i < ps.staged.size(); ++i) {
        copy += ps.ev_copy[2 * i + 1]->elapsed_ms_since(*ps.ev_copy[2 * i]);
        for (const auto& r : ps.staged[i].runs) bytes += static_cast<double>(r.bytes);
      }
    }
    const float total = ps.ev_end->elapsed_ms_since(*ps.ev_begin);
    std::fprintf(stderr,
                 "ktune: prefill chunk of %lld tokens at %lld: %.2f ms on the GPU: attention "
                 "%.2f, router + grouping %.2f, experts + combine %.2f (incl. waits for copies); "
                 "copies %.2f ms busy, %.2f GB, %.1f GB/s%s\n",
                 static_cast<long long>(n), static_cast<long long>(pos0), total, attn, route, moe,
                 copy, bytes / 1e9, copy > 0 ? bytes / 1e6 / copy : 0.0,
                 stage ? (ps.pinned ? " (registered)" : " (bounce)") : "");
  }
}

void GpuEngine::prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits) {
  if (ds_) return ds_->prefill(tokens, n, logits);  // token by token (gpu_engine_deepseek.h)
  if (pipe_) return pipe_->prefill(tokens, n, logits);
  Impl& m = *impl_;
  if (n <= 0) return;
  if (tokens == nullptr) {
    throw Error("gpu engine", "prefill of " + std::to_string(n) + " tokens from a null pointer",
                "pass the prompt's token ids", ErrorKind::Usage);
  }
  if (m.host_pos + n > m.max_ctx) {
    throw Error("gpu engine",
                "prefill of " + std::to_string(n) + " tokens at position " +
                    std::to_string(m.host_pos) + " exceeds max_context " +
                    std::to_string(m.max_ctx),
                "raise max_context or reset()");
  }
  PrefillState& ps = *m.prefill_state;
  for (int64_t i = 0; i < n;) {
    const int64_t c = ps.enabled ? std::min(ps.chunk, n - i) : n - i;
    const bool last = i + c == n;
    if (!ps.enabled || (m.is_hybrid && (!ps.staging_ok || c < ps.min_staged))) {
      for (int64_t j = 0; j < c; ++j) decode(tokens[i + j], last && j + 1 == c ? logits : nullptr);
    } else {
      trace::Scope step(trace::Phase::PrefillStep, static_cast<int32_t>(c));
      m.prefill_chunk(tokens + i, c, last, logits);
    }
    i += c;
  }
  m.sync();
}

}  // namespace ktune
