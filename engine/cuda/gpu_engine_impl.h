// GpuEngine::Impl, shared by the files of the GPU engine (engine/cuda/gpu_engine*.cpp), and its
// base gpu_detail::EngineCore, which the deepseek2 engine (gpu_engine_deepseek.h) shares:
//   gpu_engine_core.cpp     EngineCore: device, uploads, hand-off block and launches, graph, sync
//   gpu_engine.cpp          construction (weights, arenas), the public API
//   gpu_engine_decode.cpp   the decode step's launches (fused step, legacy step)
//   gpu_engine_moe.cpp      the MoE of a layer: fused, unfused, CPU experts and their hand-off
//   gpu_engine_prefill.cpp  batched prefill (state: gpu_engine_prefill.h)
//   gpu_engine_batch.cpp    concurrent sequences: batched decode steps (state: gpu_engine_batch.h)
//   gpu_engine_rows.cpp     layer pieces over token rows that prefill and batched steps share
// Private to the engine: nothing outside engine/cuda includes it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/cpu_expert_driver.h"
#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/hybrid_kernels.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/thread_pool.h"

namespace ktune {

struct PrefillState;  // gpu_engine_prefill.h
struct BatchState;    // gpu_engine_batch.h

namespace gpu_detail {

struct TokenRows;  // gpu_engine_rows.h

constexpr size_t kAlign = 256;

inline size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// A weight tensor on the device.
struct DevTensor {
  QuantType type = QuantType::F32;
  const void* data = nullptr;
  int64_t row_len = 0;
  int64_t rows = 0;          // all rows (experts: ne[1] * ne[2])
  int64_t matrix_bytes = 0;  // one expert's matrix (ne[1] rows)
};

struct DevLayer {
  DevTensor attn_norm, wq, wk, wv, wo, q_norm, k_norm, ffn_norm, router, gate, up, down;
  // Hybrid: experts of this layer on the GPU (gate/up/down hold only those, compacted) and on
  // the CPU; slot_map (device, n_experts int32: slot or -1) when the layer mixes, else nullptr.
  int64_t n_gpu_experts = 0;
  int64_t n_cpu_experts = 0;
  const int32_t* slot_map = nullptr;
  std::vector<int32_t> host_slot;  // the same map on the host (unfused path); empty: slot = id
  // PCIe assist (Impl::pcie_num > 0): the layer's whole expert tensors in host memory, registered
  // with CUDA (the host pointers work on the device), expert e at e * host_matrix_bytes.
  const void* host_gate = nullptr;
  const void* host_up = nullptr;
  const void* host_down = nullptr;
  int64_t host_gate_bytes = 0, host_up_bytes = 0, host_down_bytes = 0;
  // The current sequence's cache; sequence s's starts s * Impl::kv_seq_elems after k_seq0.
  uint16_t* k_cache = nullptr;
  uint16_t* v_cache = nullptr;
  uint16_t* k_seq0 = nullptr;
  uint16_t* v_seq0 = nullptr;
};

inline void check_launch(cudaError_t err, const char* what) {
  cuda::check(err, what, __FILE__, __LINE__);
}

// The part of the model one Impl runs. The single-GPU engine is one Impl over every layer; the
// multi-GPU layer split (gpu_pipeline.h) is one Impl per GPU, a "stage" over a range of layers,
// the embedding on the first and the head on the last.
struct StageSpec {
  int device = 0;            // CUDA device index
  int64_t first_layer = 0;   // layers [first_layer, end_layer)
  int64_t end_layer = -1;    // -1: every layer
  bool embedding = true;     // token embedding (first stage)
  bool head = true;          // output norm + head + greedy sampling (last stage)
  // Pipeline stages: the CPU pool, CpuMoe and the hand-off driver belong to the pipeline (one
  // for all stages) and the pipeline points the stage at them and at stage 0's mapped block.
  bool shared_cpu_side = false;
};

// What the two single-GPU decode engines, GpuEngine::Impl (qwen3moe) and GpuEngine::Deepseek
// (deepseek2, gpu_engine_deepseek.h), hold and do the same way (gpu_engine_core.cpp): the device,
// its stream and the two arenas, weight uploads, the routing stage and the mapped hand-off block
// the CPU experts' driver reads, the CPU side (pool, CpuMoe, driver), the step's CUDA graph
// (captured on first use), its launch and the synchronisation that raises the step's errors, and
// the public calls that only feed tokens and read results. An engine adds its model: weights,
// activations, and the step's launches (enqueue_step).
struct EngineCore {
  // Makes the stream on the current device (open_device makes it again on the engine's).
  EngineCore(const ModelConfig& model, const GpuEngineOptions& options);
  virtual ~EngineCore();  // release()
  EngineCore(const EngineCore&) = delete;
  EngineCore& operator=(const EngineCore&) = delete;

  const ModelConfig cfg;
  GpuEngineOptions opt;
  std::string device_name;
  int64_t max_ctx = 0;

  cuda::DeviceArena weights_arena;
  cuda::DeviceArena work_arena;
  cuda::Stream stream;

  // Device memory the shared calls use, allocated by the engine in work_arena: the residual
  // stream (hidden floats), the logits (vocab), the token, position and hand-off epoch words, the
  // greedy history (max_ctx tokens).
  float* x = nullptr;
  float* logits = nullptr;
  int32_t *token = nullptr, *pos = nullptr, *history = nullptr;
  uint32_t* epoch = nullptr;
  // Routing stage, one contiguous block so one copy moves it (CpuExpertDriver's layout):
  // [h: hidden floats][ids: top_k int32, 16-byte padded][wts: top_k floats]. h, ids, wts point
  // into it.
  void* stage = nullptr;
  size_t stage_bytes = 0, stage_ids_off = 0, stage_wts_off = 0;
  float* h = nullptr;
  int32_t* ids = nullptr;
  float* wts = nullptr;

  // Pinned host staging: the token written by decode(); one mapped block (cudaHostAllocMapped)
  // for the CPU-expert hand-off: error word, per-layer HandoffWords, the routing stage, the CPU
  // experts' partial sum (h_* host views, d_* device views of the same bytes).
  int32_t* h_token = nullptr;
  uint8_t* mapped = nullptr;
  uint32_t* h_error = nullptr;
  uint32_t* d_error = nullptr;
  cuda::HandoffWords* h_words = nullptr;
  cuda::HandoffWords* d_words = nullptr;
  uint8_t* h_stage = nullptr;
  void* d_stage_mapped = nullptr;
  float* d_ycpu_mapped = nullptr;
  float* h_h = nullptr;
  int32_t* h_ids = nullptr;
  float* h_wts = nullptr;
  float* h_ycpu = nullptr;

  // Hybrid mode (some expert on the CPU).
  bool is_hybrid = false;
  int64_t cpu_experts_total = 0;
  std::unique_ptr<ThreadPool> pool;
  std::unique_ptr<CpuMoe> cpu_moe;
  // Hand-off of CPU experts to the driver thread; seq = epoch << 32 | position, the epoch bumped
  // by rewind() (device copy in `epoch`). Pipeline stages use the pipeline's (shared_driver).
  std::unique_ptr<CpuExpertDriver> driver;
  CpuExpertDriver* shared_driver = nullptr;
  CpuExpertDriver* cpu_side_driver() { return driver ? driver.get() : shared_driver; }
  // The single-sequence steps hand CPU experts to the driver (run_step arms it).
  bool single_handoff = false;
  // Hybrid: the host thread waits for the stream on this event, sleeping, so it does not spin
  // on a core the CPU experts need (cudaStreamSynchronize spins by default).
  std::unique_ptr<cuda::Event> ev_sleep_sync;
  uint32_t host_epoch = 1;

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;
  int64_t host_pos = 0;
  // The device `pos` word no longer holds host_pos (another sequence's steps moved it): it is
  // uploaded again before the next single step (sync_single_pos).
  bool single_pos_stale = false;

  // ---- construction ----
  // Checks the device index, makes `device` current, names it, and makes the stream on it.
  void open_device(int device);
  // Placement map (opt.expert_on_gpu; empty: every expert on the GPU).
  bool expert_on_gpu(int64_t l, int64_t e) const;
  int64_t gpu_expert_count(int64_t l) const;
  std::vector<int32_t> gpu_slots(int64_t l) const;  // expert id -> slot (GPU experts in id order)
  DevTensor upload(const TensorView& t);  // into weights_arena (no data: an empty DevTensor)
  // The GPU experts' matrices of an expert tensor, compacted: slot s holds host_slot's s-th.
  DevTensor upload_experts(const TensorView& t, const std::vector<int32_t>& host_slot,
                           int64_t n_gpu);
  const int32_t* upload_slot_map(const std::vector<int32_t>& host_slot);  // device copy
  void plan_stage();  // stage_*: the routing stage's layout for cfg's hidden and top-k
  void bind_stage();  // allocates the stage in work_arena and points h, ids, wts into it
  // h_token, the mapped hand-off block and its views; uploads the first epoch.
  void alloc_handoff_block();
  void start_cpu_side(const ModelWeights& w);  // pool, CpuMoe, the sleeping sync event
  // The driver of these layers, on the core the pinned pool left free.
  void start_driver(std::vector<CpuExpertDriver::Layer> layers);
  // Stream drained, driver gone, graph and pinned blocks freed (idempotent).
  void release();

  // ---- steps ----
  virtual void enqueue_step() = 0;  // one decode step's launches on the stream
  void run_step();                  // arms the driver, launches, advances host_pos
  void launch_step();               // graph replay (captured on first use) or eager launches
  uint64_t step_seq() const;        // seq of the step at host_pos
  void sync();                      // stream sync + hand-off errors -> ktune::Error
  void set_token(int32_t t);
  void sync_single_pos();  // re-uploads host_pos to `pos` when stale
  // Position 0 on host and device and a new hand-off epoch (call after sync()).
  void rewind();
  void begin_handoff(int64_t l);  // routing of layer l to the CPU side (flags or host node)
  void end_handoff(int64_t l);    // wait for layer l's CPU experts and add their sum into x

  // ---- public calls (GpuEngine's) ----
  void decode(int32_t t, std::vector<float>* out_logits);
  std::vector<int32_t> generate_greedy(int32_t first_token, int64_t n);
  // describe()'s part for the CPU experts: ", N/total experts on cpu (threads, cpus, handoff)".
  std::string describe_cpu_side(int64_t experts, const std::string& handoff) const;
};

// The first allowed CPU that no pool worker is pinned to (the CPU-expert driver's core), or -1
// when the workers are not pinned. The one-GPU engines and the layer-split pipeline both use it.
int free_core(const ThreadPool& pool, bool pinned);

}  // namespace gpu_detail

struct GpuEngine::Impl : gpu_detail::EngineCore {
  using DevTensor = gpu_detail::DevTensor;
  using DevLayer = gpu_detail::DevLayer;

  int64_t hidden, n_heads, n_kv, hd, nq, nkv_rows, n_exp, top_k, ffn, vocab, layers;

  DevTensor tok_embd, output_norm, output;
  std::vector<DevLayer> L;

  // Activations and per-step state (device); x, h (in the stage), ids, wts, logits, token, pos,
  // history and epoch are EngineCore's.
  float *q, *k, *v, *qn, *kn, *attn, *o, *rlog, *act, *g, *u, *ye, *acc, *inv_freq;
  unsigned* router_counter = nullptr;  // launch_matvec_fused's router tail (self-resetting)
  // opt.count_experts: selections of layers lb..le-1, (le - lb) x n_exp int32 (router tail).
  int32_t* expert_counts_d = nullptr;
  void* attn_ws = nullptr;
  // KTUNE_GPU_LEGACY=1: the step as one launch per op (separate norms, rope, residual adds,
  // router top-k; launch_matvec), for A/B timing against the fused step.
  bool legacy = false;

  // PCIe assist (KTUNE_PCIE_ASSIST=share, fused MoE with the driver): the GPU computes
  // pcie_assist_count(n_cpu, pcie_num, pcie_den) of each token's CPU experts from host memory
  // (hybrid_kernels.h); pcie_map is their slot map, rewritten per layer. 0: off.
  int pcie_num = 0, pcie_den = 1;
  int64_t pcie_k = 0;  // the most experts a token hands the GPU: pcie_assist_count(top_k, ...)
  int32_t* pcie_map = nullptr;
  int32_t* pcie_ids = nullptr;  // the assisted experts of the layer being run, compacted
  float* pcie_wts = nullptr;
  std::string pcie_note;  // why a requested assist is off ("" when on or not asked for)
  void setup_pcie_assist(const ModelWeights& w);

  // Hybrid mode: the host-driven unfused step's selection of CPU experts.
  std::vector<int32_t> sel_ids;
  std::vector<float> sel_w;
  float* ycpu = nullptr;  // device copy of the CPU partial sum

  // decode-speed: the greedy tail of the fused step's output-head launch (launch_matvec_fused's
  // argmax_key and counter): one 16-byte block zeroed at construction, reset by the kernel.
  unsigned long long* head_key = nullptr;
  unsigned* head_counter = nullptr;

  // Stage (multi-GPU): which layers on which device (gpu_detail::StageSpec); lb..le the range.
  gpu_detail::StageSpec spec;
  int64_t lb = 0, le = 0;
  // Pipeline stages (spec.shared_cpu_side): the pipeline's CpuMoe (and EngineCore's
  // shared_driver, its driver).
  CpuMoe* shared_moe = nullptr;
  CpuMoe& cpu_side_moe() { return cpu_moe ? *cpu_moe : *shared_moe; }

  Impl(const ModelWeights& w, const GpuEngineOptions& options,
       const gpu_detail::StageSpec& stage_spec = gpu_detail::StageSpec());
  ~Impl() override;
  void matvec(const DevTensor& t, const float* in, float* out, int64_t rows);
  void enqueue_step() override;
  void enqueue_step_fused();
  void moe(const DevLayer& d, int64_t l);
  void cpu_experts(const DevLayer& d, int64_t l);
  void enqueue_step_legacy();
  void moe_unfused(const DevLayer& d, int64_t l);
  void moe_unfused_slots(const DevLayer& d, int64_t l);  // unfused, graph-capturable
  // Adds this Impl's counted selections to out (rows lb..le-1 of n_layers x n_exp).
  void add_expert_counts(std::vector<std::vector<uint64_t>>& out);

  // Concurrent sequences (gpu_engine_batch.cpp). host_pos is the current sequence's position;
  // seq_pos[s] the others' (seq_pos[cur_seq] is stale while it is current). The device `pos`
  // word serves the single-sequence steps of the current sequence and is re-uploaded before one
  // when a batched step or set_sequence moved it (single_pos_stale).
  int64_t max_seq = 1;
  int64_t kv_seq_elems = 0;  // fp16 elements of one sequence's K (or V) cache of one layer
  int64_t cur_seq = 0;
  std::vector<int64_t> seq_pos;
  // EngineCore's single_handoff: fused steps, or any step in a graph; the driver may also exist
  // for batched steps alone.
  std::unique_ptr<BatchState> batch_state;
  int64_t& seq_position(int64_t s) {
    return s == cur_seq ? host_pos : seq_pos[static_cast<size_t>(s)];
  }
  int64_t seq_position(int64_t s) const {
    return s == cur_seq ? host_pos : seq_pos[static_cast<size_t>(s)];
  }
  void select_sequence(int64_t s);  // sync, switch caches and position (gpu_engine_batch.cpp)
  void batch_setup(const ModelWeights& w);
  void enqueue_batch_step(int64_t n);
  void batch_moe(const DevLayer& d, int64_t l, int64_t n);
  void launch_batch_step(int64_t n);  // its graph for n sequences (captured once) or eager
  void run_batch_step(int64_t n);     // arms the driver, launches, advances the positions
  void batch_upload(const int32_t* tokens, int64_t n);  // tokens and every position
  uint64_t batch_seq() const;

  // prefill: the batched prefill's state and steps (gpu_engine_prefill.{h,cpp}); set up at the
  // end of the constructor.
  std::unique_ptr<PrefillState> prefill_state;
  void prefill_setup(const ModelWeights& w);
  void prefill_chunk(const int32_t* tokens, int64_t n, bool last, std::vector<float>* out_logits);
  void prefill_layer(int64_t l, int64_t n, int64_t pos0, bool stage);

  // Layer pieces over n token rows, shared by prefill chunks and batched decode steps
  // (gpu_engine_rows.cpp). `sfx` is appended to the launches' names in errors (" (batch)").
  void rows_matmul(const DevTensor& t, int64_t n, const uint16_t* a, float* y, bool accumulate,
                   const char* what, const char* sfx);  // Y (+)= A W^T, fp16 rows a
  void rows_qkv(const DevLayer& d, const gpu_detail::TokenRows& r, int64_t n,
                const char* sfx);  // attention norm (fp16 out), q, k, v
  void rows_router(const DevLayer& d, const gpu_detail::TokenRows& r, int64_t n,
                   const char* sfx);  // ffn norm (f32 + fp16 out), router logits, top-k
  void rows_experts(const DevLayer& d, const gpu_detail::TokenRows& r, int64_t l, int64_t n,
                    const char* sfx);  // grouped gate/up + SwiGLU, down into r.ye
};

}  // namespace ktune
