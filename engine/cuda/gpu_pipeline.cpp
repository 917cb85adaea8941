// GpuEngine::Pipeline (cuda/gpu_pipeline.h): the multi-GPU layer split.
#include "cuda/gpu_pipeline.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <utility>

#include "cuda/gpu_engine_prefill.h"
#include "ktune/engine/error.h"
#include "ktune/engine/trace.h"

namespace ktune {

namespace {

// Restores the caller's current device (a single-GPU engine in the same process expects its
// own device to stay current between calls).
class DeviceGuard {
 public:
  DeviceGuard() {
    if (cudaGetDevice(&saved_) != cudaSuccess) {
      cudaGetLastError();
      saved_ = -1;
    }
  }
  ~DeviceGuard() {
    if (saved_ >= 0) cudaSetDevice(saved_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int saved_ = -1;
};

}  // namespace

GpuEngine::Pipeline::Pipeline(const ModelWeights& w, const GpuEngineOptions& options,
                              const GpuStagePlan& p)
    : opt(options), plan(p) {
  DeviceGuard guard;
  for (const GpuStage& st : plan.stages) {
    gpu_detail::StageSpec sp;
    sp.device = st.device;
    sp.first_layer = st.first_layer;
    sp.end_layer = st.end_layer;
    sp.embedding = st.embedding;
    sp.head = st.head;
    sp.shared_cpu_side = true;
    stages.push_back(std::make_unique<Impl>(w, opt, sp));
    is_hybrid = is_hybrid || stages.back()->is_hybrid;
    cpu_experts_total += stages.back()->cpu_experts_total;
  }
  // One hand-off block for all: stage 0's (words indexed by model layer).
  Impl& s0 = *stages.front();
  for (size_t i = 1; i < stages.size(); ++i) {
    Impl& s = *stages[i];
    s.h_error = s0.h_error;
    s.d_error = s0.d_error;
    s.h_words = s0.h_words;
    s.d_words = s0.d_words;
    s.h_stage = s0.h_stage;
    s.d_stage_mapped = s0.d_stage_mapped;
    s.h_ycpu = s0.h_ycpu;
    s.d_ycpu_mapped = s0.d_ycpu_mapped;
    s.h_h = s0.h_h;
    s.h_ids = s0.h_ids;
    s.h_wts = s0.h_wts;
  }
  if (is_hybrid) {
    pool = std::make_unique<ThreadPool>(
        opt.cpu_threads > 0 ? opt.cpu_threads : hybrid_cpu_threads_default(), opt.pin_threads);
    cpu_moe = std::make_unique<CpuMoe>(w, *pool);
    for (auto& s : stages) s->shared_moe = cpu_moe.get();
    // As the single-GPU engine: the host-driven unfused step (no graph) computes CPU experts on
    // the calling thread; every other hybrid step hands them to the driver thread.
    if (opt.moe_kernel == MoeKernel::Fused || opt.cuda_graph) {
      std::vector<CpuExpertDriver::Layer> hl;
      for (int64_t l = 0; l < w.cfg.n_layers; ++l) {
        Impl& s = *stages[static_cast<size_t>(plan.stage_of_layer[static_cast<size_t>(l)])];
        if (s.L[static_cast<size_t>(l)].n_cpu_experts > 0) {
          hl.push_back({l, &s.L[static_cast<size_t>(l)].host_slot});
        }
      }
      CpuExpertDriver::Shared sh{s0.h_words, s0.h_h, s0.h_ids, s0.h_wts, s0.h_ycpu, s0.h_error};
      driver = std::make_unique<CpuExpertDriver>(
          *cpu_moe, sh, std::move(hl), s0.top_k, s0.n_exp,
          std::chrono::milliseconds(opt.handoff_timeout_ms), gpu_detail::free_core(*pool, opt.pin_threads));
      for (auto& s : stages) s->shared_driver = driver.get();
    }
  }
  if (stages.size() > 1) {
    const PrefillState& ps = *s0.prefill_state;
    const int64_t rows = ps.enabled ? std::max<int64_t>(ps.chunk, 1) : 1;
    choose_link(static_cast<size_t>(rows * s0.hidden) * sizeof(float));
  }
}

GpuEngine::Pipeline::~Pipeline() {
  // Streams idle before the driver, the link and the stages' memory go (stage 0 last: its
  // mapped block is everyone's).
  for (size_t i = 0; i < stages.size(); ++i) {
    set_device(i);
    cudaStreamSynchronize(stages[i]->stream);
  }
  driver.reset();
  link.reset();
  for (size_t i = stages.size(); i-- > 0;) {
    set_device(i);
    stages[i].reset();
  }
  cpu_moe.reset();
  pool.reset();
}

void GpuEngine::Pipeline::set_device(size_t i) const {
  KTUNE_CUDA_CHECK(cudaSetDevice(stages[i]->spec.device));
}

void GpuEngine::Pipeline::choose_link(size_t max_bytes) {
  std::vector<int> devices;
  std::vector<cudaStream_t> streams;
  std::vector<std::pair<int, int>> pairs;
  const int n = static_cast<int>(stages.size());
  for (int i = 0; i < n; ++i) {
    devices.push_back(stages[size_t(i)]->spec.device);
    streams.push_back(stages[size_t(i)]->stream);
    if (i + 1 < n) pairs.emplace_back(i, i + 1);
  }
  pairs.emplace_back(n - 1, 0);
  auto make_peer = [&] { return cuda::make_peer_link(devices, streams, pairs, max_bytes); };
  if (opt.gpu_transport == GpuTransport::Peer) {
    link = make_peer();
    return;
  }
  if (opt.gpu_transport == GpuTransport::Nccl) {
    link = cuda::make_nccl_link(devices, streams);
    return;
  }
  // Auto: one hidden state along the chain and back, 3 warm-up rounds, then 50 timed; the
  // smaller wall time per hop wins.
  if (!cuda::nccl_built()) {
    link = make_peer();
    link_note = "auto: no NCCL in this build";
    return;
  }
  auto per_hop_us = [&](cuda::GpuLink& l) {
    const size_t bytes = static_cast<size_t>(stages[0]->hidden) * sizeof(float);
    auto round = [&] {
      for (int i = 0; i + 1 < n; ++i) {
        l.copy(i, stages[size_t(i)]->x, i + 1, stages[size_t(i) + 1]->x, bytes);
      }
      l.copy(n - 1, stages[size_t(n) - 1]->x, 0, stages[0]->x, bytes);
    };
    auto wait_all = [&] {
      for (int i = 0; i < n; ++i) {
        set_device(size_t(i));
        KTUNE_CUDA_CHECK(cudaStreamSynchronize(stages[size_t(i)]->stream));
      }
    };
    for (int r = 0; r < 3; ++r) round();
    wait_all();
    const int kRounds = 50;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < kRounds; ++r) round();
    wait_all();
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    return us / (kRounds * n);
  };
  std::unique_ptr<cuda::GpuLink> peer = make_peer();
  std::unique_ptr<cuda::GpuLink> nccl;
  std::string nccl_error;
  try {
    nccl = cuda::make_nccl_link(devices, streams);
  } catch (const Error& e) {
    nccl_error = e.what();
  }
  const double t_peer = per_hop_us(*peer);
  if (!nccl) {
    link = std::move(peer);
    link_note = "auto: NCCL failed to start (" + nccl_error + ")";
    return;
  }
  const double t_nccl = per_hop_us(*nccl);
  char buf[160];
  std::snprintf(buf, sizeof buf, "auto: nccl %.1f us, peer %.1f us per hop", t_nccl, t_peer);
  link_note = buf;
  link = t_nccl < t_peer ? std::move(nccl) : std::move(peer);
}

void GpuEngine::Pipeline::sync_stream(size_t i) {
  Impl& s = *stages[i];
  set_device(i);
  if (s.ev_sleep_sync) {
    KTUNE_CUDA_CHECK(cudaEventRecord(*s.ev_sleep_sync, s.stream));
    KTUNE_CUDA_CHECK(cudaEventSynchronize(*s.ev_sleep_sync));
  } else {
    KTUNE_CUDA_CHECK(cudaStreamSynchronize(s.stream));
  }
}

void GpuEngine::Pipeline::sync() {
  // Later stages first; stage 0's Impl::sync then waits for its stream, finishes the shared
  // driver and reports the hand-off error word (stage 0's block is everyone's).
  try {
    for (size_t i = stages.size(); i-- > 1;) sync_stream(i);
  } catch (...) {
    if (driver) driver->finish();
    throw;
  }
  set_device(0);
  stages.front()->sync();
}

void GpuEngine::Pipeline::set_token(int32_t t) {
  sync();  // h_token may still be read by a copy
  Impl& s0 = *stages.front();
  *s0.h_token = t;
  set_device(0);
  KTUNE_CUDA_CHECK(
      cudaMemcpyAsync(s0.token, s0.h_token, sizeof(int32_t), cudaMemcpyHostToDevice, s0.stream));
}

void GpuEngine::Pipeline::hop_hidden(size_t to, const float* src, float* dst, int64_t rows) {
  const size_t bytes = static_cast<size_t>(rows * stages[to]->hidden) * sizeof(float);
  trace::Scope transfer(trace::Phase::Transfer, static_cast<int32_t>(stages[to]->lb));
  link->copy(static_cast<int>(to) - 1, src, static_cast<int>(to), dst, bytes);
}

void GpuEngine::Pipeline::return_token() {
  if (!link) return;
  const size_t last = stages.size() - 1;
  link->copy(static_cast<int>(last), stages[last]->token, 0, stages[0]->token, sizeof(int32_t));
}

void GpuEngine::Pipeline::run_step() {
  const int64_t max_ctx = stages.front()->max_ctx;
  if (host_pos >= max_ctx) {
    throw Error("gpu engine", "context full (" + std::to_string(max_ctx) + " positions)",
                "raise max_context or reset()");
  }
  trace::Scope step(trace::Phase::DecodeStep, 1);
  if (driver) driver->arm(stages.front()->step_seq());
  try {
    for (size_t i = 0; i < stages.size(); ++i) {
      set_device(i);
      if (i > 0) hop_hidden(i, stages[i - 1]->x, stages[i]->x, 1);
      set_device(i);
      stages[i]->launch_step();
    }
    return_token();
  } catch (...) {
    if (driver) driver->cancel();
    throw;
  }
  ++host_pos;
  for (auto& s : stages) ++s->host_pos;
}

void GpuEngine::Pipeline::reset() {
  DeviceGuard guard;
  sync();
  ++host_epoch;  // hand-off words left from before never match the new steps' seq
  for (size_t i = 0; i < stages.size(); ++i) {
    Impl& s = *stages[i];
    set_device(i);
    s.host_epoch = host_epoch;
    KTUNE_CUDA_CHECK(
        cudaMemcpyAsync(s.epoch, &s.host_epoch, sizeof(uint32_t), cudaMemcpyHostToDevice, s.stream));
    KTUNE_CUDA_CHECK(cudaMemsetAsync(s.pos, 0, sizeof(int32_t), s.stream));
    KTUNE_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    s.host_pos = 0;
  }
  host_pos = 0;
}

void GpuEngine::Pipeline::decode(int32_t token, std::vector<float>* logits) {
  DeviceGuard guard;
  set_token(token);
  run_step();
  if (logits) {
    const size_t last = stages.size() - 1;
    Impl& s = *stages[last];
    logits->resize(static_cast<size_t>(s.vocab));
    set_device(last);
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(logits->data(), s.logits,
                                     static_cast<size_t>(s.vocab) * sizeof(float),
                                     cudaMemcpyDeviceToHost, s.stream));
  }
  sync();
}

std::vector<int32_t> GpuEngine::Pipeline::generate_greedy(int32_t first_token, int64_t n) {
  DeviceGuard guard;
  if (n <= 0) return {};
  const int64_t max_ctx = stages.front()->max_ctx;
  if (host_pos + n > max_ctx) {
    throw Error("gpu engine",
                "generating " + std::to_string(n) + " tokens at position " +
                    std::to_string(host_pos) + " exceeds max_context " + std::to_string(max_ctx),
                "raise max_context or reset()");
  }
  const int64_t p0 = host_pos;
  set_token(first_token);
  for (int64_t i = 0; i < n; ++i) run_step();
  std::vector<int32_t> out(static_cast<size_t>(n));
  const size_t last = stages.size() - 1;
  set_device(last);
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(out.data(), stages[last]->history + p0,
                                   static_cast<size_t>(n) * 4, cudaMemcpyDeviceToHost,
                                   stages[last]->stream));
  sync();
  return out;
}

void GpuEngine::Pipeline::prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits) {
  DeviceGuard guard;
  if (n <= 0) return;
  if (tokens == nullptr) {
    throw Error("gpu engine", "prefill of " + std::to_string(n) + " tokens from a null pointer",
                "pass the prompt's token ids", ErrorKind::Usage);
  }
  const int64_t max_ctx = stages.front()->max_ctx;
  if (host_pos + n > max_ctx) {
    throw Error("gpu engine",
                "prefill of " + std::to_string(n) + " tokens at position " +
                    std::to_string(host_pos) + " exceeds max_context " + std::to_string(max_ctx),
                "raise max_context or reset()");
  }
  bool enabled = true, staging_ok = true;
  int64_t min_staged = 0;
  for (const auto& s : stages) {
    const PrefillState& ps = *s->prefill_state;
    enabled = enabled && ps.enabled;
    if (s->is_hybrid) staging_ok = staging_ok && ps.staging_ok;
    min_staged = std::max(min_staged, ps.min_staged);
  }
  const int64_t chunk = stages.front()->prefill_state->chunk;
  const size_t last_stage = stages.size() - 1;
  for (int64_t i = 0; i < n;) {
    const int64_t c = enabled ? std::min(chunk, n - i) : n - i;
    const bool last = i + c == n;
    if (!enabled || (is_hybrid && (!staging_ok || c < min_staged))) {
      for (int64_t j = 0; j < c; ++j) decode(tokens[i + j], last && j + 1 == c ? logits : nullptr);
    } else {
      trace::Scope step(trace::Phase::PrefillStep, static_cast<int32_t>(c));
      for (size_t s = 0; s < stages.size(); ++s) {
        set_device(s);
        if (s > 0) {
          hop_hidden(s, stages[s - 1]->prefill_state->x, stages[s]->prefill_state->x, c);
          set_device(s);
        }
        stages[s]->prefill_chunk(tokens + i, c, last, s == last_stage ? logits : nullptr);
      }
      if (last) return_token();
      host_pos += c;
    }
    i += c;
  }
  sync();
}

int64_t GpuEngine::Pipeline::device_bytes() const {
  int64_t b = 0;
  for (const auto& s : stages) {
    b += static_cast<int64_t>(s->weights_arena.capacity() + s->work_arena.capacity() +
                              s->prefill_state->arena.capacity());
  }
  return b;
}

std::string GpuEngine::Pipeline::describe() const {
  std::string gpus;
  for (const auto& s : stages) {
    gpus += (gpus.empty() ? "" : " + ") + std::string("cuda:") + std::to_string(s->spec.device) +
            " " + s->device_name;
  }
  std::string s = gpus + " (" + plan.describe();
  if (link) s += ", transport " + link->describe() + (link_note.empty() ? "" : " [" + link_note + "]");
  s += "), moe " + std::string(moe_kernel_name(opt.moe_kernel)) + ", graph " +
       (opt.cuda_graph ? "on (one per GPU)" : "off");
  if (is_hybrid) {
    const int64_t total = stages.front()->n_exp * stages.front()->layers;
    s += ", " + std::to_string(cpu_experts_total) + "/" + std::to_string(total) +
         " experts on cpu (" + std::to_string(pool->size()) + " threads, handoff " +
         (driver ? cpu_handoff_name(opt.cpu_handoff) : "host thread") + ")";
  }
  return s;
}

}  // namespace ktune
