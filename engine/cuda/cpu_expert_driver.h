// The CPU half of the GPU engine's CPU-expert hand-off (design §3): one host thread that
// computes, for each decode step the host launched, the CPU experts of every hybrid layer in
// order, while the GPU runs the step (one CUDA graph, or eager launches) without the host
// thread in the loop.
//
// Shared state lives in mapped pinned memory (hybrid_kernels.h HandoffWords, one per layer; a
// stage block with the routing of the current layer; a y block with the CPU experts' sum):
//   GPU (or host node) : stage <- routing of layer l; words[l].request = seq
//   driver             : spins until words[l].request == seq; CpuMoe over the selected CPU
//                        experts (slot order) -> y; words[l].n_cpu = n; words[l].done = seq
//   GPU                : spins until words[l].done == seq; x += y (when n > 0)
// Layers run strictly in order, so one stage and one y block serve all layers: the GPU writes
// layer l+1's routing only after it has read layer l's result, and the driver writes layer l+1's
// result only after it has seen layer l+1's request.
//
// Steps: the host arms every step (its seq) before launching it; the driver takes armed steps in
// order and drops a step from the queue before publishing its last layer, so the host-node
// callbacks can read the running step's seq as the queue's front.
//
// Batched steps (GpuEngine::decode_batch, B tokens): armed with their token count, they use a
// second routing block (enable_batch: B normed states, B top-k lists) and y block (B sums),
// computed by CpuMoeBatch (experts grouped over the tokens); the words and the protocol are the
// same. n_cpu is then the number of (token, CPU expert) pairs.
//
// Two ways to publish a request (GpuEngineOptions::cpu_handoff):
//   flags      the GPU kernel launch_handoff_signal writes the request word;
//   host_node  a cudaLaunchHostFunc callback (host_post) writes it, and a second one (host_wait)
//              blocks the stream until the done word is published (ktransformers' pattern).
// Nothing waits forever: the driver gives up on a request after `timeout` (the GPU never
// arrived), the GPU's wait kernel and host_wait give up on a done word after it (the CPU side
// stalled); either way the error is reported by finish() / the error word, never a hang.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/cuda/hybrid_kernels.h"

namespace ktune {

class CpuMoeBatch;

class CpuExpertDriver {
 public:
  struct Shared {               // host views of the mapped block
    cuda::HandoffWords* words;  // one per model layer (indexed by layer)
    const float* h;             // stage: normed hidden state (hidden floats)
    const int32_t* ids;         // stage: top-k expert ids
    const float* wts;           // stage: top-k weights
    float* y;                   // CPU experts' weighted sum (hidden floats)
    uint32_t* error;            // GPU-side error word (0 = fine)
  };
  struct Layer {
    int64_t index;                     // model layer
    const std::vector<int32_t>* slot;  // expert id -> GPU slot, -1 = CPU expert
  };
  struct BatchShared {   // host views of the batched steps' blocks (mapped memory)
    const float* h;      // [max_tokens][hidden] normed hidden states
    const int32_t* ids;  // [max_tokens][top_k]
    const float* wts;    // [max_tokens][top_k]
    float* y;            // [max_tokens][hidden] CPU experts' sums (zeros: no CPU expert)
    int64_t hidden;
    int64_t max_tokens;
  };

  // Error codes written to *Shared::error: kErrorTimeoutBase + layer from the GPU's wait kernel,
  // kErrorHostWait + layer from host_wait.
  static constexpr uint32_t kErrorTimeoutBase = 1;
  static constexpr uint32_t kErrorHostWait = 1u << 20;

  // Starts the driver thread, pinned to `cpu` when >= 0 (the core the pool leaves to its
  // thread 0). `moe` and the memory behind `shared` and `layers` must outlive it.
  CpuExpertDriver(CpuMoe& moe, const Shared& shared, std::vector<Layer> layers, int64_t top_k,
                  int64_t n_experts, std::chrono::milliseconds timeout, int cpu = -1);
  ~CpuExpertDriver();
  CpuExpertDriver(const CpuExpertDriver&) = delete;
  CpuExpertDriver& operator=(const CpuExpertDriver&) = delete;

  // Batched steps: their blocks and the grouped CPU MoE (both must outlive the driver). Call
  // before the first batched arm().
  void enable_batch(const BatchShared& shared, CpuMoeBatch* moe);

  // PCIe assist (hybrid_kernels.h): single-token steps skip the last
  // pcie_assist_count(n_cpu, num, den) CPU experts in top-k order, which the GPU computes. Call
  // before the first arm(); num 0: off.
  void set_pcie_assist(int num, int den) {
    pcie_num_ = num;
    pcie_den_ = den;
  }

  // The host is about to launch the step whose seq is `seq` (epoch << 32 | position); tokens > 0:
  // a batched step of that many tokens (enable_batch), 0: a single-token step.
  void arm(uint64_t seq, int64_t tokens = 0);
  // The host could not launch the armed steps: forget them.
  void cancel();
  // Once the stream is synchronised: waits (bounded) until every armed step is processed, and
  // returns what went wrong ("" when nothing), clearing it. Call before the next arm().
  std::string finish();

  // cudaLaunchHostFunc callbacks of the host_node hand-off; ctx = host_node_ctx(layer).
  static void host_post(void* ctx);
  static void host_wait(void* ctx);
  void* host_node_ctx(int64_t layer);

 private:
  struct NodeCtx {
    CpuExpertDriver* self = nullptr;
    int64_t layer = 0;
    uint64_t seq = 0;
  };
  void loop();
  // Spins until *word == seq; false on timeout, stop, or (until_cancelled) an empty queue.
  bool wait_word(const uint64_t* word, uint64_t seq, bool until_cancelled);
  int select_and_compute(const Layer& layer);  // returns n CPU experts (throws)
  int select_and_compute_batch(const Layer& layer, int64_t tokens);  // returns pairs (throws)
  void fail(const std::string& what);

  CpuMoe& moe_;
  int pcie_num_ = 0, pcie_den_ = 1;
  Shared shared_;
  std::vector<Layer> layers_;
  std::vector<NodeCtx> node_ctx_;  // indexed by model layer
  int64_t top_k_, n_experts_;
  std::chrono::milliseconds timeout_;
  std::chrono::milliseconds test_stall_{0};  // KTUNE_TEST_HANDOFF_STALL_MS (tests only)
  std::vector<int32_t> sel_ids_;
  std::vector<float> sel_w_;
  BatchShared batch_{};
  CpuMoeBatch* batch_moe_ = nullptr;
  std::vector<int32_t> bsel_ids_, bsel_n_;  // [max_tokens][top_k], [max_tokens]
  std::vector<float> bsel_w_;

  struct Armed {
    uint64_t seq;
    int64_t tokens;  // 0: single-token step
  };
  std::mutex mu_;
  std::condition_variable cv_;       // armed steps / stop, for the driver
  std::condition_variable idle_cv_;  // queue drained, for finish()
  std::deque<Armed> armed_;
  bool stop_ = false;
  std::string error_;
  // KTUNE_HANDOFF_STATS=1: time spent waiting for the GPU's requests and computing, printed to
  // stderr when the driver stops (a quick look before the profiler's spans exist).
  bool stats_ = false;
  int64_t stat_layers_ = 0, stat_wait_ns_ = 0, stat_compute_ns_ = 0, stat_publish_ns_ = 0;
  std::thread thread_;
};

// After a step's stream synchronization (`err`, its status): throws one ktune::Error for what
// went wrong in the step - a CUDA error, a hand-off timeout that the wait kernel or a host node
// wrote to *error_word (cleared here), the CPU side's failure (`cpu_side`, the driver's finish())
// - or returns when nothing did. Shared by the qwen3moe and deepseek2 GPU engines.
void raise_step_errors(int err, uint32_t* error_word, const std::string& cpu_side,
                       int64_t timeout_ms);

}  // namespace ktune
