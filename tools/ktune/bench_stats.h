// Small statistics for self-describing benchmark output (mean ± stddev over repetitions).
#pragma once

#include <cmath>
#include <nlohmann/json.hpp>
#include <vector>

namespace ktune::cli {

struct Stat {
  double mean = 0;
  double stddev = 0;  // sample standard deviation (n - 1); 0 for one sample
  std::vector<double> samples;

  static Stat of(const std::vector<double>& xs) {
    Stat s;
    s.samples = xs;
    if (xs.empty()) return s;
    double sum = 0;
    for (double x : xs) sum += x;
    s.mean = sum / xs.size();
    if (xs.size() > 1) {
      double ss = 0;
      for (double x : xs) ss += (x - s.mean) * (x - s.mean);
      s.stddev = std::sqrt(ss / (xs.size() - 1));
    }
    return s;
  }
  nlohmann::json to_json() const {
    return {{"mean", mean}, {"stddev", stddev}, {"samples", samples}};
  }
};

}  // namespace ktune::cli
