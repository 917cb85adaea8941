// Profile comparison (profiler/compare.h).
#include "profiler/compare.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "ktune/engine/error.h"

namespace ktune::profiler {

using nlohmann::json;

namespace {

struct Side {
  const json* doc = nullptr;
  const json* window = nullptr;
  const json* gpu = nullptr;  // busiest GPU of the window (null: none)
  std::string kind;           // decode | steps | run
  double units = 1;           // tokens or steps (>= 1)
  std::string label;
};

double num(const json& j, const char* key, double dflt = 0) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_number()) return dflt;
  return j[key].get<double>();
}

Side side_of(const json& d, const std::string& name) {
  Side s;
  s.doc = &d;
  if (!d.is_object() || !d.contains("ktune_profile")) {
    throw Error(name, "not a ktune profile (no \"ktune_profile\" key)",
                "pass profile.json files written by `ktune profile` or `ktune profile --exec`");
  }
  const json* w = nullptr;
  if (d.contains("windows") && d["windows"].is_object()) {
    for (const char* k : {"decode", "steps", "run"}) {
      if (d["windows"].contains(k) && d["windows"][k].is_object()) {
        w = &d["windows"][k];
        s.kind = k;
        break;
      }
    }
  }
  if (w == nullptr) {
    throw Error(name, "has no decode, steps or run window to compare",
                "a --hardware profile describes the machine only; compare profiles of runs");
  }
  s.window = w;
  s.units = std::max(1.0, num(*w, "tokens", 1));
  if (w->contains("gpus") && (*w)["gpus"].is_array()) {
    double best = -1;
    for (const json& g : (*w)["gpus"]) {
      if (num(g, "kernels") > 0 && num(g, "busy_us") > best) {
        best = num(g, "busy_us");
        s.gpu = &g;
      }
    }
  }
  const json run = d.value("run", json::object());
  if (run.value("engine", std::string()) == "exec") {
    s.label = "program: " + run.value("command", std::string());
  } else if (!run.value("engine", std::string()).empty()) {
    s.label = fmt::format(
        "engine {}: {} ({}), graph {}, moe {}", run.value("engine", std::string()),
        run.value("model", std::string()), run.value("placement", std::string()),
        run.value("cuda_graph", false) ? "on" : "off", run.value("moe_kernel", std::string()));
  } else {
    s.label = name;
  }
  return s;
}

double floor_for(const std::string& unit) {
  if (unit == "µs" || unit == "µs/step" || unit == "µs/token" || unit == "µs/unit") return 1.0;
  if (unit == "ms") return 0.01;
  if (unit == "%") return 2.0;
  if (unit == "/unit") return 0.5;
  return 0.0;
}

}  // namespace

bool compare_matters(const CompareRow& r) {
  if (!r.has_a || !r.has_b) return false;
  const double d = std::fabs(r.b - r.a);
  const double scale = std::max(std::fabs(r.a), std::fabs(r.b));
  if (scale <= 0) return false;
  return d >= kCompareRelative * scale && d >= floor_for(r.unit);
}

Comparison compare_profiles(const json& a, const std::string& name_a, const json& b,
                            const std::string& name_b) {
  const Side A = side_of(a, name_a), B = side_of(b, name_b);
  Comparison c;
  c.name_a = name_a;
  c.name_b = name_b;
  c.label_a = A.label;
  c.label_b = B.label;
  auto per_of = [](const Side& s) {
    return s.kind == "steps" ? std::string("step") : s.kind == "run" ? "run" : "token";
  };
  c.per = per_of(A) == per_of(B) ? per_of(A) : per_of(A) + "|" + per_of(B);
  if (per_of(A) != per_of(B)) {
    c.notes.push_back(
        fmt::format("{} counts {}s and {} counts {}s: per-unit rows compare them as "
                    "if one {} were one {}",
                    name_a, per_of(A), name_b, per_of(B), per_of(A), per_of(B)));
  }
  auto add = [&](const std::string& section, const std::string& metric, const std::string& unit,
                 bool ha, double va, bool hb, double vb, int better_when) {
    CompareRow r;
    r.section = section;
    r.metric = metric;
    r.unit = unit;
    r.has_a = ha;
    r.has_b = hb;
    r.a = va;
    r.b = vb;
    r.better_when = better_when;
    r.matters = compare_matters(r);
    if (r.matters) {
      if (better_when == 0) {
        r.verdict = "changed";
      } else {
        r.verdict = (better_when > 0) == (vb > va) ? "better" : "worse";
      }
    }
    c.rows.push_back(std::move(r));
  };
  const std::string rate_unit = c.per == "step" ? "steps/s" : c.per == "token" ? "tok/s" : "/s";
  add("speed", "rate", rate_unit, A.kind != "run", num(*A.window, "tok_s"), B.kind != "run",
      num(*B.window, "tok_s"), +1);
  add("speed", "time per " + c.per, "ms", true, num(*A.window, "wall_us") / A.units / 1e3, true,
      num(*B.window, "wall_us") / B.units / 1e3, -1);

  auto g = [](const Side& s, const char* path1, const char* path2 = nullptr) -> double {
    if (s.gpu == nullptr) return 0;
    const json& x = *s.gpu;
    if (path2 == nullptr) return num(x, path1);
    return x.contains(path1) ? num(x[path1], path2) : 0;
  };
  const bool ga = A.gpu != nullptr, gb = B.gpu != nullptr;
  if (!ga || !gb) {
    c.notes.push_back(fmt::format("{} has no GPU kernels in its window: GPU rows are blank for it",
                                  !ga ? name_a : name_b));
  }
  add("gpu", "GPU idle", "%", ga, 100 * g(A, "idle_fraction"), gb, 100 * g(B, "idle_fraction"), -1);
  add("gpu", "kernel gaps per " + c.per, "/unit", ga, g(A, "gaps", "count") / A.units, gb,
      g(B, "gaps", "count") / B.units, -1);
  add("gpu", "gap time per " + c.per, "µs/unit", ga, g(A, "gaps", "sum_us") / A.units, gb,
      g(B, "gaps", "sum_us") / B.units, -1);
  add("gpu", "median gap", "µs", ga, g(A, "gaps", "median_us"), gb, g(B, "gaps", "median_us"), -1);
  add("gpu", "p90 gap", "µs", ga, g(A, "gaps", "p90_us"), gb, g(B, "gaps", "p90_us"), -1);
  add("gpu", "kernels per " + c.per, "/unit", ga, g(A, "kernels_per_token"), gb,
      g(B, "kernels_per_token"), -1);
  add("gpu", "launches per " + c.per, "/unit", ga, g(A, "launches_per_token"), gb,
      g(B, "launches_per_token"), -1);
  add("gpu", "graph launches per " + c.per, "/unit", ga, g(A, "graph_launches") / A.units, gb,
      g(B, "graph_launches") / B.units, 0);
  add("gpu", "launch call (median)", "µs", ga, g(A, "launch_latency", "call_median_us"), gb,
      g(B, "launch_latency", "call_median_us"), -1);
  add("gpu", "launch latency (median)", "µs", ga, g(A, "launch_latency", "median_us"), gb,
      g(B, "launch_latency", "median_us"), -1);
  add("gpu", "GPU busy per " + c.per, "µs/unit", ga, g(A, "busy_us") / A.units, gb,
      g(B, "busy_us") / B.units, -1);

  // Per-phase GPU time per unit.
  std::set<std::string> phases;
  for (const Side* s : {&A, &B}) {
    if (s->gpu != nullptr && s->gpu->contains("phases")) {
      for (auto it = (*s->gpu)["phases"].begin(); it != (*s->gpu)["phases"].end(); ++it) {
        phases.insert(it.key());
      }
    }
  }
  auto phase_us = [](const Side& s, const std::string& p, bool* has) {
    *has = s.gpu != nullptr && s.gpu->contains("phases") && (*s.gpu)["phases"].contains(p);
    return *has ? num((*s.gpu)["phases"][p], "wall_us") / s.units : 0.0;
  };
  for (const std::string& p : phases) {
    bool ha = false, hb = false;
    const double va = phase_us(A, p, &ha), vb = phase_us(B, p, &hb);
    add("phases", p + " GPU time per " + c.per, "µs/unit", ha || ga, va, hb || gb, vb, -1);
  }
  // The per-unit budget.
  std::vector<std::string> names;
  auto budget = [](const Side& s, const std::string& n, bool* has) {
    *has = false;
    if (!s.window->contains("budget_us_per_token")) return 0.0;
    for (const json& it : (*s.window)["budget_us_per_token"]) {
      if (it.value("name", std::string()) == n) {
        *has = true;
        return num(it, "us_per_token");
      }
    }
    return 0.0;
  };
  for (const Side* s : {&A, &B}) {
    if (!s->window->contains("budget_us_per_token")) continue;
    for (const json& it : (*s->window)["budget_us_per_token"]) {
      const std::string n = it.value("name", std::string());
      if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
    }
  }
  for (const std::string& n : names) {
    bool ha = false, hb = false;
    const double va = budget(A, n, &ha), vb = budget(B, n, &hb);
    add("budget", n + " per " + c.per, "µs/unit", ha || A.gpu != nullptr, va,
        hb || B.gpu != nullptr, vb, -1);
  }
  // NVTX ranges (--exec profiles): GPU time of the ranges both name, per unit.
  auto ranges = [](const Side& s) {
    std::map<std::string, double> m;
    if (s.doc->contains("exec") && (*s.doc)["exec"].contains("nvtx_ranges")) {
      for (const json& r : (*s.doc)["exec"]["nvtx_ranges"]) {
        m[r.value("name", std::string())] += num(r, "gpu_busy_us") / s.units;
      }
    }
    return m;
  };
  const auto ra = ranges(A), rb = ranges(B);
  for (const auto& [n, va] : ra) {
    auto it = rb.find(n);
    if (it == rb.end()) continue;
    add("nvtx", "range \"" + n + "\" GPU time per " + c.per, "µs/unit", true, va, true, it->second,
        -1);
  }
  return c;
}

namespace {

std::string cell(bool has, double v, const std::string& unit) {
  if (!has) return "-";
  if (unit == "%" || unit == "ms" || unit == "steps/s" || unit == "tok/s" || unit == "/s") {
    return fmt::format("{:.2f}", v);
  }
  return fmt::format("{:.1f}", v);
}

std::string show_unit(const std::string& unit, const std::string& per) {
  if (unit == "/unit") return "";
  if (unit == "µs/unit") return "µs";
  (void)per;
  return unit;
}

}  // namespace

std::string comparison_text(const Comparison& c) {
  std::string o;
  o += fmt::format("A: {}  ({})\nB: {}  ({})\n", c.name_a, c.label_a, c.name_b, c.label_b);
  for (const std::string& n : c.notes) o += "note: " + n + "\n";
  o += fmt::format("\n{:<44} {:>12} {:>12} {:>12} {:>8}\n", "metric", "A", "B", "B - A", "B / A");
  std::string section;
  for (const CompareRow& r : c.rows) {
    if (r.section != section) {
      section = r.section;
      o += fmt::format("-- {}\n", section);
    }
    const std::string u = show_unit(r.unit, c.per);
    const std::string name = u.empty() ? r.metric : r.metric + " (" + u + ")";
    const bool both = r.has_a && r.has_b;
    o += fmt::format("{}{:<43} {:>12} {:>12} {:>12} {:>8}{}\n", r.matters ? "*" : " ",
                     name.substr(0, 43), cell(r.has_a, r.a, r.unit), cell(r.has_b, r.b, r.unit),
                     both ? cell(true, r.b - r.a, r.unit) : "-",
                     both && r.a != 0 ? fmt::format("{:.2f}x", r.b / r.a) : "-",
                     r.matters ? "  " + r.verdict : "");
  }
  std::vector<const CompareRow*> m;
  for (const CompareRow& r : c.rows) {
    if (r.matters) m.push_back(&r);
  }
  std::sort(m.begin(), m.end(), [](const CompareRow* x, const CompareRow* y) {
    auto rel = [](const CompareRow* r) {
      return std::fabs(r->b - r->a) / std::max(std::fabs(r->a), std::fabs(r->b));
    };
    return rel(x) > rel(y);
  });
  o += fmt::format(
      "\ndifferences that matter (* above: |B - A| >= {:.0f} % of the larger value and above the "
      "metric's floor: 1 µs, 0.01 ms, 2 points of idle, 0.5 per {}):\n",
      100 * kCompareRelative, c.per);
  if (m.empty()) o += "  none: the two profiles agree within noise\n";
  for (const CompareRow* r : m) {
    o += fmt::format("  {} {}: {} -> {} ({:+.0f} %)\n", r->verdict, r->metric,
                     cell(true, r->a, r->unit), cell(true, r->b, r->unit),
                     r->a != 0 ? 100 * (r->b - r->a) / std::fabs(r->a) : 0.0);
  }
  return o;
}

json to_json(const Comparison& c) {
  json j;
  j["a"] = {{"file", c.name_a}, {"label", c.label_a}};
  j["b"] = {{"file", c.name_b}, {"label", c.label_b}};
  j["per"] = c.per;
  j["rule"] = fmt::format(
      "matters when |b - a| >= {:.0f} % of max(|a|, |b|) and >= the unit's "
      "floor (µs: 1, ms: 0.01, %: 2, per-unit counts: 0.5, rates: none)",
      100 * kCompareRelative);
  j["notes"] = c.notes;
  j["rows"] = json::array();
  for (const CompareRow& r : c.rows) {
    json x = {{"section", r.section},
              {"metric", r.metric},
              {"unit", r.unit},
              {"a", r.has_a ? json(r.a) : json(nullptr)},
              {"b", r.has_b ? json(r.b) : json(nullptr)},
              {"matters", r.matters},
              {"verdict", r.verdict}};
    x["better_when"] = r.better_when > 0 ? "higher" : r.better_when < 0 ? "lower" : "neither";
    j["rows"].push_back(x);
  }
  return j;
}

}  // namespace ktune::profiler
