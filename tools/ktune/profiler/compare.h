// `ktune compare a.json b.json`: two profiles side by side (engine profiles and `--exec`
// profiles alike), with the differences that matter flagged. Pure functions over the two parsed
// documents, so tests compare hand-built profiles with known answers.
//
// The rule for "matters" (docs/exec.md, "Comparing profiles"): the change is at least 10 % of
// the larger of the two values AND at least the metric's floor (1 µs for per-step times, 0.01 ms
// for step/token times, 2 percentage points for idle, 0.5 for counts per step, none for rates).
// Below that, differences are within run-to-run noise for these metrics.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace ktune::profiler {

struct CompareRow {
  std::string section;  // "speed", "gpu", "phases", "budget", "nvtx"
  std::string metric;
  std::string unit;
  bool has_a = false, has_b = false;
  double a = 0, b = 0;
  int better_when = -1;  // +1: higher is better, -1: lower is better, 0: neither
  bool matters = false;
  std::string verdict;  // "better" | "worse" | "changed" | "" (B relative to A)
};

struct Comparison {
  std::string name_a, name_b;
  std::string label_a, label_b;  // what each profile is (program / model + placement)
  std::string per;               // "token", "step" or "token|step"
  std::vector<CompareRow> rows;
  std::vector<std::string> notes;
};

constexpr double kCompareRelative = 0.10;

// Throws ktune::Error naming the file when a document has no window to compare.
Comparison compare_profiles(const nlohmann::json& a, const std::string& name_a,
                            const nlohmann::json& b, const std::string& name_b);
bool compare_matters(const CompareRow& r);  // the rule above (used to fill CompareRow::matters)

std::string comparison_text(const Comparison& c);
nlohmann::json to_json(const Comparison& c);

}  // namespace ktune::profiler
