// `ktune compare a.json b.json [--json]`: flags -> compare_profiles (profiler/compare.h).
#include <iostream>

#include "cli.h"
#include "profiler/compare.h"
#include "profiler/profile_summary.h"

namespace ktune::cli {

void add_compare_command(CLI::App& app) {
  auto a = std::make_shared<std::string>();
  auto b = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  auto* sub = app.add_subcommand(
      "compare",
      "Two profiles side by side (from `ktune profile` or `ktune profile --exec`): tok/s or\n"
      "steps/s, GPU idle, gaps, kernels and launches per step, launch latency, per-phase and\n"
      "per-NVTX-range GPU time; differences of 10 % or more (above a small floor) are marked.\n"
      "Example: ktune compare unfused.json fused.json");
  sub->add_option("a", *a, "first profile.json (A)")->required();
  sub->add_option("b", *b, "second profile.json (B)")->required();
  sub->add_flag("--json", *as_json, "Print the comparison as JSON");
  sub->callback([a, b, as_json] {
    const nlohmann::json da = profile::read_profile_document(*a);
    const nlohmann::json db = profile::read_profile_document(*b);
    const profiler::Comparison c = profiler::compare_profiles(da, *a, db, *b);
    if (*as_json) {
      std::cout << profiler::to_json(c).dump(1) << "\n";
    } else {
      std::cout << profiler::comparison_text(c);
    }
  });
}

}  // namespace ktune::cli
