#include "run_bench_gpu.h"

#include <unistd.h>

#include <cstdio>

#include "cli.h"
#include "ktune/engine/gpu_engine.h"

namespace ktune::cli {

GpuBenchResult bench_gpu_engine(const ModelWeights& model, const GpuBenchSettings& s,
                                const std::vector<int32_t>& prompt_tokens) {
  GpuEngineOptions o;
  o.max_context = s.max_context;
  o.cuda_graph = s.cuda_graph;
  o.moe_kernel = s.fused ? MoeKernel::Fused : MoeKernel::Unfused;
  o.expert_on_gpu = s.expert_on_gpu;
  o.cpu_threads = s.cpu_threads;
  o.cpu_handoff = s.handoff_host_node ? CpuHandoff::HostNode : CpuHandoff::Flags;
  GpuEngine engine(model, o);
  std::vector<float> logits;
  std::vector<double> pp, tg;
  const bool tty = s.progress && isatty(STDERR_FILENO);
  for (int rep = 0; rep <= s.reps; ++rep) {  // rep 0 warms up (and captures the graph)
    if (s.prompt > 0) {
      engine.reset();
      const double t0 = now_seconds();
      engine.prefill(prompt_tokens.data(), s.prompt, &logits);
      const double dt = now_seconds() - t0;
      if (rep > 0) pp.push_back(static_cast<double>(s.prompt) / dt);
    }
    if (s.gen > 0) {
      engine.reset();
      const double t0 = now_seconds();
      engine.generate_greedy(prompt_tokens[0], s.gen);  // reads the tokens back: synchronised
      const double dt = now_seconds() - t0;
      if (rep > 0) tg.push_back(static_cast<double>(s.gen) / dt);
    }
    if (tty && rep > 0) {
      std::fprintf(stderr, "\rktune: %s: repetition %d/%d", s.label.c_str(), rep, s.reps);
    }
  }
  if (tty) std::fprintf(stderr, "\r%60s\r", "");
  GpuBenchResult r;
  r.prefill = Stat::of(pp);
  r.decode = Stat::of(tg);
  r.describe = engine.describe();
  r.device_bytes = engine.device_bytes();
  return r;
}

}  // namespace ktune::cli
