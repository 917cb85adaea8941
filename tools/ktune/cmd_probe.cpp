// `ktune probe`: measures this machine's DRAM read bandwidth (the ceiling of CPU decode).
#include <fmt/format.h>

#include <algorithm>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "ktune/engine/build_info.h"
#include "ktune/engine/error.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/thread_pool.h"
#include "model_arg.h"

namespace ktune::cli {
namespace {

struct ProbeOptions {
  std::vector<int> threads;
  double size_mib = 0;
  bool size_mib_given = false;  // else 4 x L3, at least 1 GiB
  int reps = 5;
  bool json = false;
};

void run_probe(const ProbeOptions& opt) {
  const int cores = physical_core_count();
  std::vector<int> list = opt.threads;
  if (list.empty()) {
    list = {1};
    if (cores >= 4) list.push_back(cores / 2);
    if (cores > 1) list.push_back(cores);
  }
  for (int t : list) {
    if (t < 1 || t > 4096) throw_usage("--threads", fmt::format("bad thread count {}", t), "use 1..N");
  }
  if (opt.reps < 1 || opt.reps > 1000) throw_usage("-r", "must be 1..1000", "e.g. -r 5");
  // 1 PiB: far beyond any machine, and far from the uint64 overflow of the byte count.
  if (opt.size_mib_given && !(opt.size_mib >= 1 && opt.size_mib <= 1073741824.0)) {
    throw_usage("--size-mib", fmt::format("{} is not 1..1073741824", opt.size_mib),
                "e.g. --size-mib 2048 (leave it out for 4 x L3, at least 1 GiB)");
  }
  const uint64_t bytes = opt.size_mib_given ? static_cast<uint64_t>(opt.size_mib * 1048576.0)
                                            : default_probe_bytes();
  // A buffer beyond the memory the host has free would be swapped or OOM-killed mid-probe
  // (with overcommit on, the mmap itself succeeds): refuse it up front.
  const int64_t avail = host_available_bytes();
  if (avail > 0 && bytes > static_cast<uint64_t>(avail)) {
    throw Error("--size-mib",
                fmt::format("a {} MiB buffer is more than the {} MiB of memory available", bytes >> 20,
                            avail >> 20),
                "give a smaller --size-mib (the default, 4 x L3, is enough to measure DRAM)");
  }
  std::vector<BandwidthResult> results;
  for (int t : list) {
    ThreadPool pool(t);
    results.push_back(measure_read_bandwidth(pool, bytes, opt.reps));
  }
  if (opt.json) {
    nlohmann::json doc = {{"ktune_version", build_version()},
                          {"commit", build_commit()},
                          {"cpu", cpu_model_name()},
                          {"physical_cores", cores},
                          {"buffer_bytes", bytes},
                          {"repetitions", opt.reps}};
    doc["results"] = nlohmann::json::array();
    for (const auto& r : results) {
      doc["results"].push_back(
          {{"threads", r.threads}, {"read_gb_s_best", r.gb_per_s}, {"read_gb_s_mean", r.mean_gb_per_s}});
    }
    std::cout << doc.dump(2) << "\n";
    return;
  }
  std::cout << fmt::format("# ktune probe  commit {}\n# cpu: {}, {} physical cores\n",
                           build_commit(), cpu_model_name(), cores);
  std::cout << fmt::format("# DRAM read bandwidth, {} buffer, best and mean of {} passes\n\n",
                           format_bytes(static_cast<double>(bytes)), opt.reps);
  std::cout << "| threads | read GB/s (best) | read GB/s (mean) |\n";
  std::cout << "| ------: | ---------------: | ---------------: |\n";
  for (const auto& r : results) {
    std::cout << fmt::format("| {:>7} | {:>16.1f} | {:>16.1f} |\n", r.threads, r.gb_per_s,
                             r.mean_gb_per_s);
  }
}

}  // namespace

void add_probe_command(CLI::App& app) {
  auto opt = std::make_shared<ProbeOptions>();
  auto* sub = app.add_subcommand(
      "probe",
      "Measure DRAM read bandwidth (the limit of CPU decode speed) with 1, half and all cores.\n"
      "Example: ktune probe --threads 1,8,16 --json");
  sub->add_option("-t,--threads", opt->threads, "Thread counts to measure, comma-separated")
      ->delimiter(',');
  auto* size = sub->add_option("--size-mib", opt->size_mib,
                               "Buffer size in MiB (default: 4 x L3, at least 1 GiB)");
  sub->add_option("-r,--repetitions", opt->reps, "Passes over the buffer")->capture_default_str();
  sub->add_flag("--json", opt->json, "One JSON document on stdout");
  sub->callback([opt, size] {
    ProbeOptions o = *opt;
    o.size_mib_given = size->count() > 0;
    run_probe(o);
  });
}

}  // namespace ktune::cli
