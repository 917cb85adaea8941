// gpu_detail::EngineCore (gpu_engine_impl.h): what the qwen3moe and the deepseek2 GPU engines
// hold and do the same way - the device, weight uploads, the routing stage and the mapped
// hand-off block, the CPU side, the step's graph, launch and synchronisation.
#include <cuda_runtime.h>
#include <sched.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "cuda/cpu_expert_driver.h"
#include "cuda/gpu_engine_impl.h"
#include "ktune/engine/cuda/hybrid_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/trace.h"

namespace ktune::gpu_detail {

EngineCore::EngineCore(const ModelConfig& model, const GpuEngineOptions& options)
    : cfg(model), opt(options), max_ctx(options.max_context) {}

EngineCore::~EngineCore() { release(); }

void EngineCore::release() {
  // Nothing may still run on the stream (host nodes call into the driver) or in the driver
  // (it reads the mapped block and runs CpuMoe) when their memory goes.
  cudaStreamSynchronize(stream);
  driver.reset();
  if (graph_exec) cudaGraphExecDestroy(graph_exec);
  if (graph) cudaGraphDestroy(graph);
  if (h_token) cudaFreeHost(h_token);
  if (mapped) cudaFreeHost(mapped);
  graph_exec = nullptr;
  graph = nullptr;
  h_token = nullptr;
  mapped = nullptr;
}

void EngineCore::open_device(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
    cudaGetLastError();
    throw Error("gpu engine", "no usable CUDA device", "run on a machine with an NVIDIA GPU");
  }
  if (device < 0 || device >= count) {
    throw Error(
        "cuda:" + std::to_string(device),
        "no such GPU here (this machine has cuda:0..cuda:" + std::to_string(count - 1) + ")",
        "use the GPUs this machine has in the placement");
  }
  KTUNE_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp prop{};
  KTUNE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  device_name = prop.name;
  // The member stream was made on whatever device was current; this one is on `device`.
  stream = cuda::Stream();
}

bool EngineCore::expert_on_gpu(int64_t l, int64_t e) const {
  return opt.expert_on_gpu.empty() ||
         opt.expert_on_gpu[static_cast<size_t>(l)][static_cast<size_t>(e)];
}

int64_t EngineCore::gpu_expert_count(int64_t l) const {
  int64_t n = 0;
  for (int64_t e = 0; e < cfg.n_experts; ++e) n += expert_on_gpu(l, e) ? 1 : 0;
  return n;
}

std::vector<int32_t> EngineCore::gpu_slots(int64_t l) const {
  std::vector<int32_t> slot(static_cast<size_t>(cfg.n_experts), -1);
  int32_t next = 0;
  for (int64_t e = 0; e < cfg.n_experts; ++e) {
    if (expert_on_gpu(l, e)) slot[static_cast<size_t>(e)] = next++;
  }
  return slot;
}

DevTensor EngineCore::upload(const TensorView& t) {
  DevTensor d;
  if (t.data == nullptr) return d;
  d.type = t.type;
  d.row_len = t.row_len();
  d.rows = t.n_rows();
  d.matrix_bytes = t.ne[1] * t.row_stride();
  void* p = weights_arena.alloc(static_cast<size_t>(t.nbytes()), kAlign);
  KTUNE_CUDA_CHECK(cudaMemcpy(p, t.data, static_cast<size_t>(t.nbytes()), cudaMemcpyHostToDevice));
  d.data = p;
  return d;
}

DevTensor EngineCore::upload_experts(const TensorView& t, const std::vector<int32_t>& host_slot,
                                     int64_t n_gpu) {
  DevTensor dt;
  dt.type = t.type;
  dt.row_len = t.row_len();
  dt.rows = t.ne[1] * n_gpu;
  dt.matrix_bytes = t.ne[1] * t.row_stride();
  if (n_gpu == 0) return dt;
  auto* p = static_cast<uint8_t*>(
      weights_arena.alloc(static_cast<size_t>(n_gpu * dt.matrix_bytes), kAlign));
  for (size_t e = 0; e < host_slot.size(); ++e) {
    const int32_t sl = host_slot[e];
    if (sl < 0) continue;
    KTUNE_CUDA_CHECK(cudaMemcpy(p + sl * dt.matrix_bytes, t.matrix(static_cast<int64_t>(e)),
                                static_cast<size_t>(dt.matrix_bytes), cudaMemcpyHostToDevice));
  }
  dt.data = p;
  return dt;
}

const int32_t* EngineCore::upload_slot_map(const std::vector<int32_t>& host_slot) {
  auto* m = static_cast<int32_t*>(weights_arena.alloc(host_slot.size() * sizeof(int32_t), kAlign));
  KTUNE_CUDA_CHECK(
      cudaMemcpy(m, host_slot.data(), host_slot.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  return m;
}

void EngineCore::plan_stage() {
  const size_t top_k = static_cast<size_t>(cfg.n_experts_used);
  stage_ids_off = static_cast<size_t>(cfg.hidden) * sizeof(float);
  stage_wts_off = stage_ids_off + (top_k * 4 + 15) / 16 * 16;
  stage_bytes = stage_wts_off + top_k * 4;
}

void EngineCore::bind_stage() {
  stage = work_arena.alloc(stage_bytes);
  h = static_cast<float*>(stage);
  ids = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(stage) + stage_ids_off);
  wts = reinterpret_cast<float*>(static_cast<uint8_t*>(stage) + stage_wts_off);
}

void EngineCore::alloc_handoff_block() {
  KTUNE_CUDA_CHECK(cudaMallocHost(&h_token, sizeof(int32_t)));
  // Mapped pinned block: [error word][HandoffWords per layer][routing stage][CPU experts' sum].
  // The unfused host-driven path copies routing into the same stage.
  const size_t words_off = 64;
  const size_t stage_off =
      words_off + static_cast<size_t>(cfg.n_layers) * sizeof(cuda::HandoffWords);
  const size_t y_off = stage_off + (stage_bytes + 63) / 64 * 64;
  const size_t mapped_bytes = y_off + static_cast<size_t>(cfg.hidden) * sizeof(float);
  KTUNE_CUDA_CHECK(cudaHostAlloc(&mapped, mapped_bytes, cudaHostAllocMapped));
  std::memset(mapped, 0, mapped_bytes);
  uint8_t* dmapped = nullptr;
  KTUNE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dmapped), mapped, 0));
  h_error = reinterpret_cast<uint32_t*>(mapped);
  d_error = reinterpret_cast<uint32_t*>(dmapped);
  h_words = reinterpret_cast<cuda::HandoffWords*>(mapped + words_off);
  d_words = reinterpret_cast<cuda::HandoffWords*>(dmapped + words_off);
  h_stage = mapped + stage_off;
  d_stage_mapped = dmapped + stage_off;
  h_ycpu = reinterpret_cast<float*>(mapped + y_off);
  d_ycpu_mapped = reinterpret_cast<float*>(dmapped + y_off);
  h_h = reinterpret_cast<float*>(h_stage);
  h_ids = reinterpret_cast<int32_t*>(h_stage + stage_ids_off);
  h_wts = reinterpret_cast<float*>(h_stage + stage_wts_off);
  // Epoch 0 would make seq 0 match the zeroed words before any hand-off: start at 1.
  KTUNE_CUDA_CHECK(cudaMemcpy(epoch, &host_epoch, sizeof(uint32_t), cudaMemcpyHostToDevice));
}

void EngineCore::start_cpu_side(const ModelWeights& w) {
  pool = std::make_unique<ThreadPool>(
      opt.cpu_threads > 0 ? opt.cpu_threads : hybrid_cpu_threads_default(), opt.pin_threads);
  cpu_moe = std::make_unique<CpuMoe>(w, *pool);
  ev_sleep_sync = std::make_unique<cuda::Event>(false, true);
}

void EngineCore::start_driver(std::vector<CpuExpertDriver::Layer> layers) {
  CpuExpertDriver::Shared sh{h_words, h_h, h_ids, h_wts, h_ycpu, h_error};
  // The driver is the pool's thread 0: give it the core the pool left free, if the workers are
  // pinned.
  driver = std::make_unique<CpuExpertDriver>(
      *cpu_moe, sh, std::move(layers), cfg.n_experts_used, cfg.n_experts,
      std::chrono::milliseconds(opt.handoff_timeout_ms), free_core(*pool, opt.pin_threads));
}

int free_core(const ThreadPool& pool, bool pinned) {
  cpu_set_t allowed;
  if (!pinned || sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return -1;
  const std::vector<int>& taken = pool.pinned_cpus();
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &allowed) && std::find(taken.begin(), taken.end(), c) == taken.end()) {
      return c;
    }
  }
  return -1;
}

void EngineCore::run_step() {
  if (host_pos >= max_ctx) {
    throw Error("gpu engine", "context full (" + std::to_string(max_ctx) + " positions)",
                "raise max_context or reset()");
  }
  trace::Scope step(trace::Phase::DecodeStep, 1);
  const bool arm = driver && single_handoff;
  if (arm) driver->arm(step_seq());
  try {
    launch_step();
  } catch (...) {
    if (arm) driver->cancel();
    throw;
  }
  ++host_pos;
}

void EngineCore::launch_step() {
  if (opt.cuda_graph) {
    if (graph_exec == nullptr) {
      KTUNE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      // Tags each captured node with its layer and phase (the Scopes of enqueue_step), so the
      // profiler can attribute kernel records of graph replays, where NVTX does not fire.
      trace::GraphCapture capture(stream);
      try {
        enqueue_step();
      } catch (...) {
        cudaGraph_t broken = nullptr;
        cudaStreamEndCapture(stream, &broken);
        if (broken) cudaGraphDestroy(broken);
        throw;
      }
      KTUNE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      capture.finish(graph);
      KTUNE_CUDA_CHECK(cudaGraphInstantiate(&graph_exec, graph, 0));
    }
    KTUNE_CUDA_CHECK(cudaGraphLaunch(graph_exec, stream));
  } else {
    enqueue_step();
  }
}

uint64_t EngineCore::step_seq() const {
  return (static_cast<uint64_t>(host_epoch) << 32) | static_cast<uint32_t>(host_pos);
}

void EngineCore::sync() {
  cudaError_t err = cudaSuccess;
  if (ev_sleep_sync) {
    err = cudaEventRecord(*ev_sleep_sync, stream);
    if (err == cudaSuccess) err = cudaEventSynchronize(*ev_sleep_sync);
  } else {
    err = cudaStreamSynchronize(stream);
  }
  CpuExpertDriver* drv = cpu_side_driver();  // a pipeline's stage 0 finishes the shared driver
  std::string cpu_side = drv ? drv->finish() : std::string();
  raise_step_errors(err, h_error, cpu_side, opt.handoff_timeout_ms);
}

void EngineCore::set_token(int32_t t) {
  sync();  // h_token may still be read by a copy
  *h_token = t;
  KTUNE_CUDA_CHECK(
      cudaMemcpyAsync(token, h_token, sizeof(int32_t), cudaMemcpyHostToDevice, stream));
}

void EngineCore::sync_single_pos() {
  if (!single_pos_stale) return;
  sync();
  const int32_t p = static_cast<int32_t>(host_pos);
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(pos, &p, sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(stream));
  single_pos_stale = false;
}

void EngineCore::rewind() {
  // A new epoch: hand-off words left from before never match the new steps' seq.
  ++host_epoch;
  KTUNE_CUDA_CHECK(
      cudaMemcpyAsync(epoch, &host_epoch, sizeof(uint32_t), cudaMemcpyHostToDevice, stream));
  KTUNE_CUDA_CHECK(cudaMemsetAsync(pos, 0, sizeof(int32_t), stream));
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(stream));
  host_pos = 0;
}

// flags: one kernel copies the routing block into mapped memory and raises the request word.
// host_node: the block is copied with a memcpy node and a host callback raises the word.
void EngineCore::begin_handoff(int64_t l) {
  trace::Scope transfer(trace::Phase::Transfer, static_cast<int32_t>(l));
  cudaStream_t s = stream;
  if (opt.cpu_handoff == CpuHandoff::Flags) {
    check_launch(
        cuda::launch_handoff_signal(stage, stage_bytes, d_stage_mapped, pos, epoch, d_words + l, s),
        "launch_handoff_signal");
  } else {
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(h_stage, stage, stage_bytes, cudaMemcpyDeviceToHost, s));
    KTUNE_CUDA_CHECK(
        cudaLaunchHostFunc(s, &CpuExpertDriver::host_post, cpu_side_driver()->host_node_ctx(l)));
  }
}

// The wait kernel spins on the done word (flags) or finds it already raised after the host
// callback that blocked until it was (host_node); either way it then adds the CPU sum into x.
void EngineCore::end_handoff(int64_t l) {
  trace::Scope transfer(trace::Phase::Transfer, static_cast<int32_t>(l));
  cudaStream_t s = stream;
  if (opt.cpu_handoff == CpuHandoff::HostNode) {
    KTUNE_CUDA_CHECK(
        cudaLaunchHostFunc(s, &CpuExpertDriver::host_wait, cpu_side_driver()->host_node_ctx(l)));
  }
  const uint64_t timeout_ns = static_cast<uint64_t>(opt.handoff_timeout_ms) * 1000000u;
  check_launch(
      cuda::launch_handoff_wait_add(d_words + l, d_ycpu_mapped, pos, epoch, d_error,
                                    CpuExpertDriver::kErrorTimeoutBase + static_cast<uint32_t>(l),
                                    timeout_ns, x, cfg.hidden, s),
      "launch_handoff_wait_add");
}

void EngineCore::decode(int32_t t, std::vector<float>* out_logits) {
  sync_single_pos();
  set_token(t);
  run_step();
  if (out_logits) {
    out_logits->resize(static_cast<size_t>(cfg.vocab));
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(out_logits->data(), logits,
                                     static_cast<size_t>(cfg.vocab) * sizeof(float),
                                     cudaMemcpyDeviceToHost, stream));
  }
  sync();
}

std::vector<int32_t> EngineCore::generate_greedy(int32_t first_token, int64_t n) {
  if (n <= 0) return {};
  if (host_pos + n > max_ctx) {
    throw Error("gpu engine",
                "generating " + std::to_string(n) + " tokens at position " +
                    std::to_string(host_pos) + " exceeds max_context " + std::to_string(max_ctx),
                "raise max_context or reset()");
  }
  sync_single_pos();
  const int64_t p0 = host_pos;
  set_token(first_token);
  for (int64_t i = 0; i < n; ++i) run_step();
  std::vector<int32_t> out(static_cast<size_t>(n));
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(out.data(), history + p0, static_cast<size_t>(n) * 4,
                                   cudaMemcpyDeviceToHost, stream));
  sync();
  return out;
}

std::string EngineCore::describe_cpu_side(int64_t experts, const std::string& handoff) const {
  // Where the workers run: a pool squeezed onto fewer cores than threads is the first thing
  // to rule out when the CPU experts are slow.
  std::string cpus;
  int unpinned = 0;
  for (int c : pool->pinned_cpus()) {
    if (c < 0) {
      ++unpinned;
    } else {
      cpus += (cpus.empty() ? "" : ",") + std::to_string(c);
    }
  }
  return ", " + std::to_string(cpu_experts_total) + "/" + std::to_string(experts) +
         " experts on cpu (" + std::to_string(pool->size()) + " threads, workers on cpus " +
         (cpus.empty() ? "-" : cpus) +
         (unpinned > 0 ? " + " + std::to_string(unpinned) + " unpinned" : "") + ", handoff " +
         handoff + ")";
}

}  // namespace ktune::gpu_detail
