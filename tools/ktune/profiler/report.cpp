// Verdict and terminal report (profiler/report.h); the HTML report is in report_html.cpp.
#include "profiler/report.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "ktune/engine/build_info.h"

namespace ktune::profiler {
namespace {

const WindowMetrics* find_window(const ProfileDoc& d, const char* kind) {
  for (const WindowMetrics& w : d.windows) {
    if (w.kind == kind) return &w;
  }
  return nullptr;
}

double budget_fraction(const WindowMetrics& w, const char* name) {
  for (const BudgetItem& b : w.budget) {
    if (b.name == name) return b.fraction;
  }
  return 0;
}

const GpuMetrics* busiest_gpu(const WindowMetrics& w) {
  const GpuMetrics* g = nullptr;
  for (const GpuMetrics& x : w.gpus) {
    if (x.kernels > 0 && (g == nullptr || x.busy_us > g->busy_us)) g = &x;
  }
  return g;
}

double expert_gb_s(const WindowMetrics& w, const std::string& dev) {
  for (const ExpertBandwidth& e : w.expert_bandwidth) {
    if (e.device == dev) return e.gb_s;
  }
  return 0;
}

int pct(double f) { return static_cast<int>(std::lround(100.0 * f)); }

std::string launch_fix(const RunInfo& r) {
  if (r.engine == "exec") {  // another program: name the remedies in its own terms
    if (!r.cuda_graph) {
      return "capture the step in a CUDA graph (torch.cuda.CUDAGraph) and fuse the many small "
             "launches (a fused MoE kernel); a host read (.item(), .tolist()) inside the step "
             "prevents capture";
    }
    return "the step is graph-launched already: see the biggest gaps for what remains";
  }
  const bool unfused = r.moe_kernel == "unfused";
  if (!r.cuda_graph && unfused) return "turn CUDA Graph on or use the fused MoE kernel";
  if (!r.cuda_graph) return "turn CUDA Graph on (--cuda-graph on)";
  if (unfused) return "use the fused MoE kernel (--moe-kernel fused)";
  return "graph and fused kernels are on already: see the biggest gaps for what remains";
}

}  // namespace

Verdict make_verdict(const ProfileDoc& doc) {
  Verdict v;
  const WindowMetrics* d = find_window(doc, "decode");
  // profile --exec: the program's steps, or its whole run when it marks no steps.
  if (d == nullptr) d = find_window(doc, "steps");
  if (d == nullptr) d = find_window(doc, "run");
  const std::string of = d == nullptr || d->kind == "decode" ? "decode"
                         : d->kind == "steps"              ? "the steps"
                                                           : "the run";
  if (d == nullptr) {
    v.headline = "no decode window was profiled (-n 0): nothing to judge";
    v.reasons = doc.topology.warnings;
    return v;
  }
  const GpuMetrics* g = busiest_gpu(*d);
  const double cpu_bw = expert_gb_s(*d, "cpu");
  if (g == nullptr) {
    // No GPU work seen: a CPU run (or a GPU run without CUPTI).
    double moe = 0;
    for (const BudgetItem& b : d->budget) {
      if (b.name == "cpu_experts") moe = b.fraction;
    }
    if (doc.run.engine == "cpu") {
      v.headline = fmt::format(
          "CPU decode at {:.1f} tok/s: CPU experts take {} % of each token{}; decode is bound by "
          "how fast the CPU reads expert weights",
          d->tok_s, pct(moe),
          cpu_bw > 0 ? fmt::format(" ({:.1f} GB/s effective)", cpu_bw) : std::string());
      if (!doc.summary.cpu.read_gb_s.empty() && cpu_bw > 0) {
        const double probe = doc.summary.cpu.read_gb_s.back().value;
        v.reasons.push_back(fmt::format(
            "CPU experts read at {:.1f} GB/s, {} % of the DRAM read probe ({:.1f} GB/s, {} threads)",
            cpu_bw, pct(cpu_bw / probe), probe, doc.summary.cpu.read_gb_s.back().threads));
      }
    } else {
      v.headline = fmt::format(
          "decode at {:.1f} tok/s; no GPU activity was recorded ({}), so GPU idle time is unknown",
          d->tok_s, doc.timeline.source_note.empty() ? "no CUPTI" : doc.timeline.source_note);
    }
    for (const std::string& w : doc.topology.warnings) v.reasons.push_back(w);
    return v;
  }
  const double idle = g->idle_fraction;
  const double f_gap = budget_fraction(*d, "launch_gaps");
  const double f_cpu = budget_fraction(*d, "cpu_experts_wait");
  const double f_tr = budget_fraction(*d, "transfers");
  const std::string dev = fmt::format("cuda:{}", g->device);
  std::string bound, fix;
  // Several GPUs in a pipeline: each waits for the others by construction (one sequence visits
  // them in turn); when that explains most of the busiest GPU's idle time, say so.
  const double pipe_wait = g->bubble_us + g->downstream_wait_us;
  const bool pipeline_bound = d->pipeline_order.size() >= 2 && d->wall_us > 0 &&
                              pipe_wait >= 0.5 * idle * d->wall_us && pipe_wait > 0;
  if (pipeline_bound) {
    bound = fmt::format("pipeline-bound ({} GPUs in turn)", d->pipeline_order.size());
    fix = "one sequence visits the GPUs one after another, so each waits for the others; use "
          "fewer GPUs if the model fits them, or give every GPU more of each token's work";
  } else if (f_cpu >= f_gap && f_cpu >= f_tr && f_cpu > 0) {
    bound = "waiting for the CPU experts";
    // The PCIe assist (fused MoE, one GPU) adds the GPU's PCIe reads to the CPU's: 72 -> 86-90
    // tok/s with every expert of qwen3-30b-a3b on the H100 machine's CPU.
    const bool assist_possible = doc.run.moe_kernel == "fused" && d->pipeline_order.size() < 2;
    fix = doc.run.pcie_assist > 0 || !assist_possible
              ? "move more experts to the GPU, or give the CPU experts more threads or bandwidth"
              : "move more experts to the GPU, let the GPU read part of the CPU experts over "
                "PCIe (--pcie-assist 0.375; ktune search picks the share), or give the CPU "
                "experts more threads or bandwidth";
  } else if (f_tr > f_gap && f_tr > 0) {
    bound = "transfer-bound";
    fix = "keep more of the step's data on the GPU (fewer host round trips)";
  } else {
    bound = "launch-bound";
    fix = launch_fix(doc.run);
  }
  if (idle > 0.5) {
    v.headline = fmt::format("GPU idle {} % of {}, {}: {}", pct(idle), of, bound, fix);
  } else if (idle > 0.15) {
    v.headline = fmt::format("GPU idle {} % of {}, partly {}: {}", pct(idle), of, bound, fix);
  } else {
    // Busy GPU: name the phase that takes most of its time.
    Phase top = Phase::Other;
    double top_us = -1;
    for (const auto& [p, pt] : g->phases) {
      if (pt.wall_us > top_us) {
        top = p;
        top_us = pt.wall_us;
      }
    }
    v.headline = fmt::format(
        "GPU busy {} % of {}: kernel-bound, {} takes {} % of GPU time; faster kernels or "
        "fewer bytes per token (more experts on the CPU only if the CPU keeps up) are what is "
        "left",
        pct(1 - idle), of, phase_name(top), g->busy_us > 0 ? pct(top_us / g->busy_us) : 0);
  }
  const char* unit = d->kind == "steps" ? "step" : d->kind == "run" ? "run" : "token";
  v.reasons.push_back(fmt::format(
      "{}: {} kernel gaps per {}, median {:.1f} µs, p90 {:.1f} µs; {:.1f} kernels and {:.1f} "
      "launches per {}",
      dev, d->tokens > 0 ? g->gaps.count / d->tokens : g->gaps.count, unit, g->gaps.median_us,
      g->gaps.p90_us, g->kernels_per_token, g->launches_per_token, unit));
  const double gpu_bw = expert_gb_s(*d, dev);
  if (gpu_bw > 0 && cpu_bw > 0) {
    v.reasons.push_back(fmt::format(
        "expert effective bandwidth: {} {:.1f} GB/s, cpu {:.1f} GB/s{}", dev, gpu_bw, cpu_bw,
        gpu_bw < cpu_bw ? " (the GPU's expert phase is slower per byte than the CPU's: it is "
                          "mostly waiting, not reading)"
                        : ""));
  } else if (gpu_bw > 0) {
    v.reasons.push_back(fmt::format("expert effective bandwidth on {}: {:.1f} GB/s", dev, gpu_bw));
  }
  if (f_cpu > 0.05) {
    v.reasons.push_back(
        fmt::format("the GPU waits for CPU experts {} % of decode time", pct(f_cpu)));
  }
  if (d->pipeline_order.size() >= 2) {
    const double tok = std::max<double>(1, static_cast<double>(d->tokens));
    std::string order;
    for (int32_t x : d->pipeline_order) order += (order.empty() ? "" : " -> ") + fmt::format("cuda:{}", x);
    v.reasons.push_back(fmt::format("pipeline {}: inter-GPU transfers {:.1f} µs per token",
                                    order, d->peer_transfer_us / tok));
    for (const GpuMetrics& x : d->gpus) {
      if (x.pipeline_stage < 0) continue;
      v.reasons.push_back(fmt::format(
          "cuda:{} (stage {}): busy {} %, waits {:.1f} µs per token for the GPUs before it and "
          "{:.1f} µs for those after it, transfers {:.1f} µs",
          x.device, x.pipeline_stage, pct(1 - x.idle_fraction), x.bubble_us / tok,
          x.downstream_wait_us / tok, x.peer_transfer_us / tok));
    }
  }
  for (const std::string& w : doc.topology.warnings) v.reasons.push_back(w);
  return v;
}

std::string terminal_report(const ProfileDoc& doc) {
  std::string o;
  const RunInfo& r = doc.run;
  o += fmt::format("# ktune profile  commit {}  (ktune {})\n", build_commit(), build_version());
  if (r.engine.empty()) {
    o += "# hardware profile (no model)\n";
  } else if (r.engine == "exec") {
    o += fmt::format("# program: {}\n# {}\n", r.command, r.engine_description);
  } else {
    o += fmt::format("# model: {}  placement: {}\n", r.model, r.placement);
    o += fmt::format("# engine: {} ({}){}{}\n", r.engine, r.engine_description,
                     r.threads > 0 ? fmt::format(", {} CPU threads", r.threads) : "",
                     r.engine == "cpu" ? "" : fmt::format(", graph {}, moe {}",
                                                          r.cuda_graph ? "on" : "off",
                                                          r.moe_kernel));
    o += fmt::format("# tokens: prefill {}, decode {} per window after {} warm-up\n", r.prompt,
                     r.gen, r.warmup);
  }
  o += fmt::format("# tracing: {}\n", r.trace_mode.empty() ? "-" : r.trace_mode);
  for (const std::string& n : doc.notes) o += "# note: " + n + "\n";
  const Overhead& oh = doc.overhead;
  if (!oh.traced_tok_s.empty() && oh.untraced_median > 0) {
    // One line per traced level (`--trace-level both`: light and full, measured back to back).
    std::vector<Overhead::Level> levels = oh.levels;
    if (levels.empty()) {
      levels.push_back({oh.trace_level, oh.traced_tok_s, oh.traced_median, oh.overhead_fraction});
    }
    for (const Overhead::Level& l : levels) {
      const std::string which = l.trace_level == "none" || l.trace_level.empty()
                                    ? std::string("host spans only")
                                    : "level " + l.trace_level;
      o += fmt::format(
          "# tracing overhead ({}): {:.1f} % on the traced steps (decode {:.2f} tok/s traced vs "
          "{:.2f} tok/s untraced, median of {}; negative: within noise)\n",
          which, 100.0 * l.overhead_fraction, l.traced_median, oh.untraced_median,
          oh.untraced_tok_s.size());
    }
    // What profiling cost the decode: the analyzed window and the untraced steps after it.
    if (oh.profile_run_tok_s > 0) {
      o += fmt::format(
          "# tracing overhead (profiling run): {:.1f} % ({} traced + {} untraced steps, "
          "--trace-padding {}: {:.2f} tok/s vs {:.2f} tok/s untraced{})\n",
          100.0 * oh.profile_run_overhead_fraction, r.gen, oh.untraced_padding_steps,
          oh.trace_padding.empty() ? "auto" : oh.trace_padding, oh.profile_run_tok_s,
          oh.untraced_pooled_tok_s > 0 ? oh.untraced_pooled_tok_s : oh.untraced_median,
          oh.untraced_pooled_tok_s > 0 ? ", every untraced step pooled" : "");
    }
  }
  if (!doc.windows.empty()) {
    if (doc.run.engine == "exec") {  // the program's steps stand where tokens stand
      o += "\n| window  |  steps |  steps/s | device | idle % | gaps/stp | median gap µs | p90 gap "
           "µs | kernels/stp | launches/stp | launch call µs | launch lat µs |\n";
    } else {
      o += "\n| window  | tokens |    tok/s | device | idle % | gaps/tok | median gap µs | p90 gap "
           "µs | kernels/tok | launches/tok | launch call µs | launch lat µs |\n";
    }
    o += "| ------- | -----: | -------: | ------ | -----: | -------: | ------------: | "
         "---------: | ----------: | -----------: | -------------: | ------------: |\n";
    for (const WindowMetrics& w : doc.windows) {
      bool any = false;
      for (const GpuMetrics& g : w.gpus) {
        if (g.kernels == 0) continue;
        any = true;
        o += fmt::format(
            "| {:<7} | {:>6} | {:>8.2f} | cuda:{} | {:>6.1f} | {:>8.1f} | {:>13.2f} | {:>9.2f} | "
            "{:>11.1f} | {:>12.1f} | {:>14.2f} | {:>13.2f} |\n",
            w.kind, w.tokens, w.tok_s, g.device, 100 * g.idle_fraction,
            w.tokens > 0 ? static_cast<double>(g.gaps.count) / static_cast<double>(w.tokens) : 0,
            g.gaps.median_us, g.gaps.p90_us, g.kernels_per_token, g.launches_per_token,
            g.launch_call_median_us, g.launch_latency_median_us);
      }
      if (!any) {
        o += fmt::format("| {:<7} | {:>6} | {:>8.2f} | cpu    | {:>6} | {:>8} | {:>13} | {:>9} | "
                         "{:>11} | {:>12} | {:>14} | {:>13} |\n",
                         w.kind, w.tokens, w.tok_s, "-", "-", "-", "-", "-", "-", "-", "-");
      }
    }
    for (const WindowMetrics& w : doc.windows) {
      if (w.gpus.size() < 2) continue;
      // Several GPUs: every GPU of the window, its place in the pipeline and its waits.
      const double tok = std::max<double>(1, static_cast<double>(w.tokens));
      std::string order;
      for (int32_t x : w.pipeline_order) {
        order += (order.empty() ? "" : " -> ") + fmt::format("cuda:{}", x);
      }
      o += fmt::format("\n{} per GPU{}; inter-GPU transfers {:.1f} µs per token:\n", w.kind,
                       order.empty() ? std::string() : " (pipeline " + order + ")",
                       w.peer_transfer_us / tok);
      o += "| device | stage | busy % | idle % | waits upstream µs/tok | waits downstream "
           "µs/tok | transfers µs/tok |\n";
      o += "| ------ | ----: | -----: | -----: | --------------------: | "
           "----------------------: | ---------------: |\n";
      for (const GpuMetrics& g : w.gpus) {
        if (g.kernels == 0) {
          o += fmt::format("| cuda:{} | {:>5} | {:>6} | {:>6} | {:>21} | {:>22} | {:>16} |\n",
                           g.device, "-", "0.0", "100.0", "-", "-", "no kernels");
          continue;
        }
        o += fmt::format(
            "| cuda:{} | {:>5} | {:>6.1f} | {:>6.1f} | {:>21.1f} | {:>22.1f} | {:>16.1f} |\n",
            g.device, g.pipeline_stage >= 0 ? std::to_string(g.pipeline_stage) : "-",
            100 * (1 - g.idle_fraction), 100 * g.idle_fraction, g.bubble_us / tok,
            g.downstream_wait_us / tok, g.peer_transfer_us / tok);
      }
    }
    for (const WindowMetrics& w : doc.windows) {
      const std::string unit = w.kind == "steps" ? "step" : w.kind == "run" ? "run" : "token";
      o += fmt::format("\nwhere each {}{}'s time went ({:.1f} µs per {}):\n",
                       w.kind == "steps" || w.kind == "run" ? "" : w.kind + " ", unit,
                       w.tokens > 0 ? w.wall_us / static_cast<double>(w.tokens) : w.wall_us,
                       unit);
      for (const BudgetItem& b : w.budget) {
        const int bar = static_cast<int>(std::lround(b.fraction * 40));
        o += fmt::format("  {:<18} {:>10.1f} µs {:>5.1f} %  {}\n", b.name, b.us_per_token,
                         100 * b.fraction, std::string(static_cast<size_t>(bar), '#'));
      }
      if (!w.expert_bandwidth.empty()) {
        o += "  expert effective bandwidth:";
        for (const ExpertBandwidth& e : w.expert_bandwidth) {
          if (e.gb_s > 0) {
            o += fmt::format(" {} {:.1f} GB/s ({:.1f} MB in {:.2f} ms);", e.device, e.gb_s,
                             e.bytes / 1e6, e.phase_wall_us / 1e3);
          } else {
            o += fmt::format(" {} n/a ({});", e.device, e.note);
          }
        }
        o += "\n";
      }
      if (w.overlap_us > 0) {
        o += fmt::format("  CPU experts overlapped GPU kernels {:.0f} % of their time\n",
                         100 * w.overlap_fraction_of_cpu_experts);
      }
      if (w.cpu.workers > 0) {
        o += fmt::format("  CPU: {} threads with spans, busy {:.1f} % of the window;", w.cpu.workers,
                         w.wall_us > 0 ? 100 * w.cpu.busy_us / w.wall_us : 0.0);
        for (const auto& [p, pt] : w.cpu.phases) {
          o += fmt::format(" {} {:.1f} µs/tok", phase_name(p),
                           pt.wall_us / std::max<double>(1, static_cast<double>(w.tokens)));
        }
        o += "\n";
      }
      for (const GpuMetrics& g : w.gpus) {
        if (g.gaps.biggest.empty()) continue;
        o += fmt::format("  biggest gaps on cuda:{}:\n", g.device);
        for (const Gap& gp : g.gaps.biggest) {
          o += fmt::format("    {:>9.1f} µs at +{:.3f} ms, after {} ({}) before {} ({})\n",
                           gp.length_us, gp.start_us / 1e3, gp.before.substr(0, 48),
                           phase_name(gp.phase_before), gp.after.substr(0, 48),
                           phase_name(gp.phase_after));
        }
      }
    }
  }
  if (doc.router.n_experts > 0) {
    o += fmt::format(
        "\nrouter: {} tokens, {} experts top-{}: {:.0f} % of experts cover 90 % of routing "
        "(mean over {} layers)\n",
        doc.router.tokens, doc.router.n_experts, doc.router.n_used,
        100 * doc.router.mean_share_for_90, doc.router.layers.size());
    if (!doc.router.warning.empty()) o += "  warning: " + doc.router.warning + "\n";
  }
  if (doc.exec.is_object()) {  // profile --exec: steps and the program's NVTX ranges
    const auto& e = doc.exec;
    if (e.value("steps", 0) > 0) {
      o += fmt::format("\nsteps: {} x \"{}\", {:.2f} steps/s, step ms median {:.3f} p90 {:.3f} "
                       "(min {:.3f}, max {:.3f})\n",
                       e.value("steps", 0), e.value("step_range", std::string()),
                       e.value("steps_per_s", 0.0), e["step_ms"].value("median", 0.0),
                       e["step_ms"].value("p90", 0.0), e["step_ms"].value("min", 0.0),
                       e["step_ms"].value("max", 0.0));
    }
    if (e.contains("nvtx_ranges") && !e["nvtx_ranges"].empty()) {
      o += "NVTX ranges in the window (kernels and GPU time: launched innermost in the range):\n";
      o += fmt::format("  {:<32} {:>7} {:>12} {:>8} {:>12}\n", "range", "count", "host ms",
                       "kernels", "GPU busy ms");
      size_t shown = 0;
      for (const auto& r : e["nvtx_ranges"]) {
        if (++shown > 12) break;
        o += fmt::format("  {:<32} {:>7} {:>12.3f} {:>8} {:>12.3f}\n",
                         r.value("name", std::string()).substr(0, 32), r.value("count", 0),
                         r.value("host_us", 0.0) / 1e3, r.value("kernels", 0),
                         r.value("gpu_busy_us", 0.0) / 1e3);
      }
    }
  }
  const Topology& t = doc.topology;
  o += fmt::format("\ntopology: {} physical cores, {} logical CPUs, {} NUMA node{}", t.physical_cores,
                   t.logical_cpus, t.numa_nodes, t.numa_nodes == 1 ? "" : "s");
  if (t.threads_used > 0) o += fmt::format(", {} engine threads", t.threads_used);
  for (const GpuLink& g : t.gpus) {
    o += fmt::format("; {} PCIe gen{} x{} (max gen{} x{})", g.device, g.cur_gen, g.cur_width,
                     g.max_gen, g.max_width);
  }
  o += "\n";
  o += "\nverdict: " + doc.verdict.headline + "\n";
  for (const std::string& s : doc.verdict.reasons) o += "  - " + s + "\n";
  return o;
}

}  // namespace ktune::profiler
