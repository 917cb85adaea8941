#include "runtime/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace ktune::cpu_ops {
namespace {

// Eight independent partial sums: the compiler vectorizes this without -ffast-math and the
// summation order is fixed, so results do not depend on the caller.
constexpr int kLanes = 8;

}  // namespace

void rmsnorm(const float* x, const float* w, float eps, int64_t n, float* y) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * x[i + j];
  }
  double ss = 0.0;
  for (; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  for (int j = 0; j < kLanes; ++j) ss += acc[j];
  const float mean = static_cast<float>(ss / static_cast<double>(n));
  const float r = 1.0f / std::sqrt(mean + eps);
  for (i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

void rope_table(int64_t pos, const float* inv_freq, int64_t d, float* cs) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(pos) * inv_freq[i];
    cs[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
    cs[half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
  }
}

void rope_table_scaled(int64_t pos, const float* inv_freq, int64_t d, float scale, float* cs) {
  rope_table(pos, inv_freq, d, cs);
  for (int64_t i = 0; i < d; ++i) cs[i] *= scale;
}

void rope_pairs(float* v, const float* cs, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float c = cs[i];
    const float s = cs[half + i];
    const float a = v[2 * i];
    const float b = v[2 * i + 1];
    v[2 * i] = a * c - b * s;
    v[2 * i + 1] = b * c + a * s;
  }
}

void rope_neox(float* v, const float* cs, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float c = cs[i];
    const float s = cs[half + i];
    const float a = v[i];
    const float b = v[half + i];
    v[i] = a * c - b * s;
    v[half + i] = b * c + a * s;
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

VecOps vec_ops(cpu::Isa isa) {
  // Clamp to an ISA this CPU runs: the engine's Isa may come from the caller.
  const std::vector<cpu::Isa> have = cpu::available_isas();
  auto runs = [&](cpu::Isa i) { return std::find(have.begin(), have.end(), i) != have.end(); };
  if (isa >= cpu::Isa::Avx512 && runs(cpu::Isa::Avx512)) return {avx512::dot, avx512::axpy};
  if (isa >= cpu::Isa::Avx2 && runs(cpu::Isa::Avx2)) return {avx2::dot, avx2::axpy};
  return {dot, axpy};
}

void attend_group(const VecOps& ops, const float* const* q, int m, const float* k_cache,
                  const float* v_cache, int64_t stride, int64_t n_cached, const float* k_last,
                  const float* v_last, int64_t d, float scale, float* scores, float* const* out) {
  const int64_t n = n_cached + (k_last ? 1 : 0);
  for (int64_t p = 0; p < n; ++p) {
    const float* k = p < n_cached ? k_cache + p * stride : k_last;
    for (int j = 0; j < m; ++j) scores[j * n + p] = ops.dot(q[j], k, d) * scale;
  }
  for (int j = 0; j < m; ++j) {
    float* s = scores + j * n;
    float mx = -INFINITY;
    for (int64_t p = 0; p < n; ++p) mx = std::max(mx, s[p]);
    float sum = 0.0f;
    for (int64_t p = 0; p < n; ++p) {
      s[p] = std::exp(s[p] - mx);
      sum += s[p];
    }
    const float inv = 1.0f / sum;
    for (int64_t p = 0; p < n; ++p) s[p] *= inv;
    for (int64_t i = 0; i < d; ++i) out[j][i] = 0.0f;
  }
  for (int64_t p = 0; p < n; ++p) {
    const float* v = p < n_cached ? v_cache + p * stride : v_last;
    for (int j = 0; j < m; ++j) ops.axpy(scores[j * n + p], v, out[j], d);
  }
}

void route_topk(const float* logits, int64_t n, int64_t k, bool norm, float* probs,
                int32_t* ids, float* weights) {
  float mx = -INFINITY;
  for (int64_t e = 0; e < n; ++e) mx = std::max(mx, logits[e]);
  double sum = 0.0;
  for (int64_t e = 0; e < n; ++e) {
    probs[e] = std::exp(logits[e] - mx);
    sum += probs[e];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t e = 0; e < n; ++e) probs[e] *= inv;
  // Selection by repeated maximum: k and n are small, and strict '>' keeps the lower index on
  // ties. The chosen ids are marked by a negative probability, restored afterwards.
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < n; ++e) {
      if (probs[e] >= 0.0f && (best < 0 || probs[e] > probs[best])) best = e;
    }
    ids[j] = static_cast<int32_t>(best);
    weights[j] = probs[best];
    probs[best] = -1.0f;
  }
  for (int64_t j = 0; j < k; ++j) probs[ids[j]] = weights[j];
  if (norm) {
    float s = 0.0f;
    for (int64_t j = 0; j < k; ++j) s += weights[j];
    for (int64_t j = 0; j < k; ++j) weights[j] /= s;
  }
  // Insertion sort by expert id (k <= a few dozen).
  for (int64_t a = 1; a < k; ++a) {
    const int32_t id = ids[a];
    const float w = weights[a];
    int64_t b = a;
    for (; b > 0 && ids[b - 1] > id; --b) {
      ids[b] = ids[b - 1];
      weights[b] = weights[b - 1];
    }
    ids[b] = id;
    weights[b] = w;
  }
}

void route_grouped(const float* logits, int64_t n, int64_t k, bool sigmoid, const float* bias,
                   int64_t groups, int64_t groups_used, bool norm, float scale, float* scratch,
                   int32_t* ids, float* weights) {
  float* score = scratch;       // what the weights are made of
  float* choice = scratch + n;  // what selection compares; -inf once excluded or taken
  float* group_score = scratch + 2 * n;
  if (sigmoid) {
    for (int64_t e = 0; e < n; ++e) score[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  } else {
    float mx = -INFINITY;
    for (int64_t e = 0; e < n; ++e) mx = std::max(mx, logits[e]);
    double sum = 0.0;
    for (int64_t e = 0; e < n; ++e) {
      score[e] = std::exp(logits[e] - mx);
      sum += score[e];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t e = 0; e < n; ++e) score[e] *= inv;
  }
  for (int64_t e = 0; e < n; ++e) choice[e] = bias ? score[e] + bias[e] : score[e];
  // Index of the largest value among v[0..m) (strict '>': ties keep the lower index).
  auto argmax = [](const float* v, int64_t m) {
    int64_t best = 0;
    for (int64_t i = 1; i < m; ++i) {
      if (v[i] > v[best]) best = i;
    }
    return best;
  };
  if (groups > 1 && groups_used < groups) {
    const int64_t per = n / groups;
    for (int64_t g = 0; g < groups; ++g) {
      const float* c = choice + g * per;
      float top1 = -INFINITY, top2 = -INFINITY;
      for (int64_t i = 0; i < per; ++i) {
        if (c[i] > top1) {
          top2 = top1;
          top1 = c[i];
        } else if (c[i] > top2) {
          top2 = c[i];
        }
      }
      group_score[g] = per > 1 ? top1 + top2 : top1;
    }
    // Keep the groups_used best groups (rank by score, ties to the lower index); exclude the rest.
    for (int64_t g = 0; g < groups; ++g) {
      int64_t rank = 0;
      for (int64_t h = 0; h < groups; ++h) {
        rank += group_score[h] > group_score[g] || (group_score[h] == group_score[g] && h < g);
      }
      if (rank >= groups_used) std::fill(choice + g * per, choice + (g + 1) * per, -INFINITY);
    }
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = argmax(choice, n);
    ids[j] = static_cast<int32_t>(e);
    weights[j] = score[e];
    sum += score[e];
    choice[e] = -INFINITY;
  }
  const float f = norm ? scale / sum : scale;
  for (int64_t j = 0; j < k; ++j) weights[j] *= f;
  // Insertion sort by expert id (k <= a few dozen).
  for (int64_t a = 1; a < k; ++a) {
    const int32_t id = ids[a];
    const float wt = weights[a];
    int64_t b = a;
    for (; b > 0 && ids[b - 1] > id; --b) {
      ids[b] = ids[b - 1];
      weights[b] = weights[b - 1];
    }
    ids[b] = id;
    weights[b] = wt;
  }
}

}  // namespace ktune::cpu_ops
