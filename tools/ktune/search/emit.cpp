// Writers and readers of what `ktune search` emits (search/emit.h).
#include "search/emit.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <functional>

#include "ktune/engine/build_info.h"
#include "ktune/engine/error.h"

namespace ktune::search {
namespace {

std::string join_ids(const std::vector<int64_t>& ids, const char* sep) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? sep : "") + std::to_string(ids[i]);
  return s;
}

// Layers of a whole-layer candidate by where their experts are; throws on a split layer.
void whole_layer_sets(const Candidate& c, std::vector<int64_t>& gpu, std::vector<int64_t>& cpu,
                      const char* what) {
  for (size_t l = 0; l < c.gpu_counts.size(); ++l) {
    const int64_t n = c.gpu_counts[l];
    const int64_t e = static_cast<int64_t>(c.on_gpu[l].size());
    if (n == 0) {
      cpu.push_back(int64_t(l));
    } else if (n == e) {
      gpu.push_back(int64_t(l));
    } else {
      throw Error(what, fmt::format("layer {} has {} of {} experts on the GPU", l, n, e),
                  "export a whole-layer placement (ktune search rounds it for you)");
    }
  }
}

// Per layer: the CUDA index of its attention (the GPU its GPU experts live on; 0 when the
// placement runs the layer on the CPU).
std::vector<int> layer_gpus(const Candidate& c) {
  std::vector<int> out;
  for (const LayerPlacement& lp : c.placement.layers) {
    out.push_back(lp.attention.is_gpu() ? lp.attention.index : 0);
  }
  if (out.empty()) out.assign(c.gpu_counts.size(), 0);
  return out;
}

// The GPUs of a candidate in layer order, each once.
std::vector<int> used_gpus(const std::vector<int>& per_layer) {
  std::vector<int> out;
  for (int g : per_layer) {
    if (out.empty() || out.back() != g) out.push_back(g);
  }
  return out;
}

}  // namespace

std::vector<std::string> candidate_comments(const Candidate& c, const SearchOptions& opt,
                                            const std::string& run_command) {
  std::vector<std::string> out;
  out.push_back(fmt::format("Written by `ktune search` (ktune {}, commit {}) from {} for {}.",
                            build_version(), build_commit(), opt.profile_path, opt.model.spec));
  out.push_back("Workload: " + opt.workload.describe());
  out.push_back("Engine: " + c.settings.describe() + (c.baseline ? " (a baseline)" : ""));
  out.push_back(fmt::format(
      "Predicted: decode {:.1f} tok/s, prefill {:.0f} tok/s; mean request {:.2f} s (prefill "
      "{:.2f} + decode {:.2f})",
      c.pred.decode_tok_s, c.pred.prefill_tok_s, c.pred.request_s, c.pred.prefill_s,
      c.pred.decode_s));
  int64_t total = 0;  // routed experts (deepseek2's dense leading layers have none)
  for (size_t l = 0; l < c.on_gpu.size(); ++l) {
    if (!opt.model.cfg.is_dense_layer(static_cast<int64_t>(l))) {
      total += static_cast<int64_t>(c.on_gpu[l].size());
    }
  }
  if (c.settings.gpu) {
    out.push_back(fmt::format(
        "GPU experts: {} of {} ({:.1f} % of the routing mass); hybrid layers {}, all-CPU layers "
        "{}",
        c.pred.gpu_experts, total, 100.0 * c.pred.gpu_mass, c.pred.hybrid_layers,
        c.pred.cpu_layers));
  }
  std::string mem;
  for (const auto& [dev, u] : c.plan.per_device) {
    mem += (mem.empty() ? "" : "; ") + dev + " " + u.breakdown();
  }
  out.push_back("Memory: " + mem);
  if (!run_command.empty()) out.push_back("Run it: " + run_command);
  return out;
}

std::string placement_yaml(const Candidate& c, const std::vector<std::string>& comments) {
  std::string s;
  for (const std::string& line : comments) s += "# " + line + "\n";
  return s + write_placement(c.placement);
}

namespace {

std::string ktransformers_rules_one_gpu(const ModelInfo& model, const Candidate& c,
                                        const std::string& dev) {
  std::vector<int64_t> gpu, cpu;
  whole_layer_sets(c, gpu, cpu, "--emit ktransformers");
  std::string s;
  s += fmt::format(
      "# ktransformers optimize rules written by `ktune search` (ktune {}, commit {})\n",
      build_version(), build_commit());
  s += fmt::format(
      "# for {} ({} layers x {} experts). Experts on {}: layers {}; the other {} "
      "layers' experts run on the CPU.\n",
      model.spec, model.cfg.n_layers, model.cfg.n_experts, dev,
      gpu.empty() ? std::string("none") : format_id_ranges(gpu), cpu.size());
  s += "# Rules are tried in order; the first match wins (GPU expert layers come first).\n";
  if (!gpu.empty()) {
    s += "# The legacy engine cannot run GPU experts inside a CUDA graph: start it with\n"
         "# --use_cuda_graph=False (local_chat) / --no-use_cuda_graph (server).\n";
  }
  const std::string linear_kwargs = fmt::format(
      "    kwargs:\n      generate_device: \"{0}\"\n      prefill_device: \"{0}\"\n"
      "      generate_op: \"KLinearMarlin\"\n      prefill_op: \"KLinearTorch\"\n",
      dev);
  s += "- match:\n    class: ktransformers.models.modeling_qwen2_moe.Qwen2MoeRotaryEmbedding\n"
       "  replace:\n    class: ktransformers.operators.RoPE.RotaryEmbedding\n";
  s += fmt::format("    kwargs:\n      generate_device: \"{0}\"\n      prefill_device: \"{0}\"\n",
                   dev);
  s += "- match:\n    name: \"^lm_head$\"\n    class: torch.nn.Linear\n  replace:\n"
       "    class: ktransformers.operators.linear.KTransformersLinear\n" +
       linear_kwargs;
  s += "- match:\n    name: \"^model\\\\.layers\\\\..*$\"\n    class: torch.nn.Linear\n  replace:\n"
       "    class: ktransformers.operators.linear.KTransformersLinear\n" +
       linear_kwargs;
  s += "- match:\n    name: \"^model\\\\.layers\\\\..*\\\\.mlp$\"\n"
       "    class: ktransformers.models.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock\n"
       "  replace:\n    class: ktransformers.operators.experts.KQwen3MoeSparseMoeBlock\n";
  s += fmt::format("    kwargs:\n      generate_device: \"{0}\"\n      prefill_device: \"{0}\"\n",
                   dev);
  auto experts_rule = [&](const std::string& layers_re, const std::string& gen_dev,
                          const char* gen_op) {
    return fmt::format(
        "- match:\n    name: \"^model\\\\.layers\\\\.{0}\\\\.mlp\\\\.experts$\"\n  replace:\n"
        "    class: ktransformers.operators.experts.KTransformersExperts\n    kwargs:\n"
        "      prefill_device: \"{1}\"\n      prefill_op: \"KExpertsTorch\"\n"
        "      generate_device: \"{2}\"\n      generate_op: \"{3}\"\n      out_device: \"{1}\"\n"
        "  recursive: False\n",
        layers_re, dev, gen_dev, gen_op);
  };
  if (!gpu.empty()) s += experts_rule("(" + join_ids(gpu, "|") + ")", dev, "KExpertsMarlin");
  s += experts_rule(".*", "cpu", "KExpertsCPU");
  s += "- match:\n    name: \"^model\\\\.embed_tokens\"\n  replace:\n    class: \"default\"\n"
       "    kwargs:\n      generate_device: \"cpu\"\n      prefill_device: \"cpu\"\n";
  return s;
}

}  // namespace

std::string ktransformers_rules(const ModelInfo& model, const Candidate& c) {
  std::vector<int64_t> gpu, cpu;
  whole_layer_sets(c, gpu, cpu, "--emit ktransformers");
  const std::vector<int> per_layer = layer_gpus(c);
  const std::vector<int> used = used_gpus(per_layer);
  if (used.size() <= 1) {
    return ktransformers_rules_one_gpu(model, c,
                                       "cuda:" + std::to_string(used.empty() ? 0 : used[0]));
  }
  // Several GPUs: ktransformers' multi-GPU rule files (pipeline split by layer-range regexes):
  // every module family gets one rule per GPU with that GPU's layer alternation, and the model
  // container's transfer_map moves the hidden state to the next GPU at its first layer.
  auto dev_of = [](int g) { return "cuda:" + std::to_string(g); };
  std::vector<std::vector<int64_t>> layers_of(used.size());
  for (size_t l = 0; l < per_layer.size(); ++l) {
    const size_t k = size_t(std::find(used.begin(), used.end(), per_layer[l]) - used.begin());
    layers_of[k].push_back(int64_t(l));
  }
  std::string s;
  s += fmt::format(
      "# ktransformers optimize rules written by `ktune search` (ktune {}, commit {})\n",
      build_version(), build_commit());
  s += fmt::format("# for {} ({} layers x {} experts) over {} GPUs (pipeline: layer ranges).\n",
                   model.spec, model.cfg.n_layers, model.cfg.n_experts, used.size());
  for (size_t k = 0; k < used.size(); ++k) {
    std::vector<int64_t> g_exp;
    for (int64_t l : layers_of[k]) {
      if (std::find(gpu.begin(), gpu.end(), l) != gpu.end()) g_exp.push_back(l);
    }
    s += fmt::format("# {}: layers {}; experts on the GPU: {}\n", dev_of(used[k]),
                     format_id_ranges(layers_of[k]),
                     g_exp.empty() ? std::string("none") : format_id_ranges(g_exp));
  }
  s += "# Rules are tried in order; the first match wins (GPU expert layers come first).\n";
  if (!gpu.empty()) {
    s += "# The legacy engine cannot run GPU experts inside a CUDA graph: start it with\n"
         "# --use_cuda_graph=False (local_chat) / --no-use_cuda_graph (server).\n";
  }
  auto alt = [](const std::vector<int64_t>& ids) { return "(" + join_ids(ids, "|") + ")"; };
  auto kw = [](const std::string& d) {
    return fmt::format(
        "    kwargs:\n      generate_device: \"{0}\"\n      prefill_device: \"{0}\"\n", d);
  };
  const std::string last = dev_of(used.back());
  s += "- match:\n    name: \"^model\\\\.embed_tokens\"\n  replace:\n    class: \"default\"\n" +
       kw("cpu");
  s += "- match:\n    name: \"^model$\"\n  replace:\n"
       "    class: \"ktransformers.operators.models.KQwen2MoeModel\"\n    kwargs:\n"
       "      per_layer_prefill_intput_threshold: 0\n      transfer_map:\n";
  for (size_t k = 1; k < used.size(); ++k) {
    s += fmt::format("        {}: \"{}\"\n", layers_of[k].front(), dev_of(used[k]));
  }
  for (size_t k = 0; k < used.size(); ++k) {
    const std::string d = dev_of(used[k]);
    const std::string r = alt(layers_of[k]);
    s += fmt::format(
        "- match:\n    name: \"^model\\\\.layers\\\\.{0}\\\\.\"\n"
        "    class: ktransformers.models.modeling_qwen2_moe.Qwen2MoeRotaryEmbedding\n"
        "  replace:\n    class: ktransformers.operators.RoPE.RotaryEmbedding\n",
        r);
    s += kw(d);
    s += fmt::format(
        "- match:\n    name: \"^model\\\\.layers\\\\.{0}\\\\..*$\"\n    class: torch.nn.Linear\n"
        "  replace:\n    class: ktransformers.operators.linear.KTransformersLinear\n"
        "    kwargs:\n      generate_device: \"{1}\"\n      prefill_device: \"{1}\"\n"
        "      generate_op: \"KLinearMarlin\"\n      prefill_op: \"KLinearTorch\"\n",
        r, d);
    s += fmt::format(
        "- match:\n    name: \"^model\\\\.layers\\\\.{0}\\\\.mlp$\"\n"
        "    class: ktransformers.models.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock\n"
        "  replace:\n    class: ktransformers.operators.experts.KQwen3MoeSparseMoeBlock\n",
        r);
    s += kw(d);
    std::vector<int64_t> g_exp, c_exp;
    for (int64_t l : layers_of[k]) {
      (std::find(gpu.begin(), gpu.end(), l) != gpu.end() ? g_exp : c_exp).push_back(l);
    }
    auto experts_rule = [&](const std::vector<int64_t>& ids, const std::string& gen_dev,
                            const char* gen_op) {
      return fmt::format(
          "- match:\n    name: \"^model\\\\.layers\\\\.{0}\\\\.mlp\\\\.experts$\"\n  replace:\n"
          "    class: ktransformers.operators.experts.KTransformersExperts\n    kwargs:\n"
          "      prefill_device: \"{1}\"\n      prefill_op: \"KExpertsTorch\"\n"
          "      generate_device: \"{2}\"\n      generate_op: \"{3}\"\n      out_device: \"{1}\"\n"
          "  recursive: False\n",
          alt(ids), d, gen_dev, gen_op);
    };
    if (!g_exp.empty()) s += experts_rule(g_exp, d, "KExpertsMarlin");
    if (!c_exp.empty()) s += experts_rule(c_exp, "cpu", "KExpertsCPU");
    // Everything else of the range (norms, attention): the range's GPU.
    s += fmt::format(
        "- match:\n    name: \"^model\\\\.layers\\\\.{0}\\\\.\"\n  replace:\n"
        "    class: \"default\"\n",
        r);
    s += kw(d);
  }
  s += "- match:\n    name: \"^lm_head$\"\n    class: torch.nn.Linear\n  replace:\n"
       "    class: ktransformers.operators.linear.KTransformersLinear\n" +
       fmt::format(
           "    kwargs:\n      generate_device: \"{0}\"\n      prefill_device: \"{0}\"\n"
           "      generate_op: \"KLinearMarlin\"\n      prefill_op: \"KLinearTorch\"\n",
           last);
  s += "- match:\n    name: \"^model\\\\.norm\"\n  replace:\n    class: \"default\"\n" + kw(last);
  return s;
}

std::string llama_cpp_overrides(const Candidate& c) {
  std::vector<int64_t> gpu, cpu;
  whole_layer_sets(c, gpu, cpu, "--emit llama-cpp");
  const std::vector<int> per_layer = layer_gpus(c);
  const std::vector<int> used = used_gpus(per_layer);
  auto item = [](const std::vector<int64_t>& ids, const std::string& buft) {
    return "blk\\.(" + join_ids(ids, "|") + ")\\.ffn_(up|down|gate)_exps\\.weight=" + buft;
  };
  if (used.size() <= 1 && (used.empty() || used[0] == 0)) {
    return cpu.empty() ? std::string() : item(cpu, "CPU");
  }
  // Several GPUs (or one other than the first): the experts of each GPU's layers pinned to it,
  // the rest to the CPU; line 2 is --tensor-split, which places the layers themselves (and
  // their KV cache): llama.cpp's layer split gives layer i (of n_layers + 1 with the output
  // layer, -ngl 999) to the first device whose cumulative share exceeds i / (n_layers + 1), so
  // whole-number shares equal to the layer counts (+1 on the last GPU for the output) put each
  // layer where the plan says.
  std::string ot;
  const int max_gpu = *std::max_element(used.begin(), used.end());
  std::vector<int64_t> count(size_t(max_gpu) + 1, 0);
  for (int g : per_layer) count[size_t(g)] += 1;
  count[size_t(used.back())] += 1;  // the output layer
  for (int g : used) {
    std::vector<int64_t> ids;
    for (int64_t l : gpu) {
      if (per_layer[size_t(l)] == g) ids.push_back(l);
    }
    if (!ids.empty()) ot += (ot.empty() ? "" : ",") + item(ids, "CUDA" + std::to_string(g));
  }
  if (!cpu.empty()) ot += (ot.empty() ? "" : ",") + item(cpu, "CPU");
  return ot + "\n" + join_ids(count, ",");
}

LlamaCppPlacement read_llama_cpp_placement(const std::string& text, int64_t n_layers) {
  LlamaCppPlacement out;
  out.experts.assign(size_t(n_layers), "");
  out.layers.assign(size_t(n_layers), "cuda:0");
  std::string ot = text, split;
  if (const size_t nl = text.find('\n'); nl != std::string::npos) {
    ot = text.substr(0, nl);
    split = text.substr(nl + 1);
    while (!split.empty() && (split.back() == '\n' || split.back() == ' ')) split.pop_back();
  }
  if (!split.empty()) {
    // llama.cpp's assignment (-ngl 999, --split-mode layer): cumulative shares as floats.
    std::vector<float> share;
    size_t pos = 0;
    while (pos <= split.size()) {
      const size_t comma = std::min(split.find(',', pos), split.size());
      const std::string v = split.substr(pos, comma - pos);
      if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos) {
        throw Error("--tensor-split", "`" + split + "` is not the form ktune writes",
                    "regenerate the file");
      }
      share.push_back(float(std::stoll(v)));
      pos = comma + 1;
    }
    float sum = 0;
    for (float& v : share) {
      sum += v;
      v = sum;
    }
    for (float& v : share) v /= sum;
    const float act = float(n_layers + 1);
    for (int64_t l = 0; l < n_layers; ++l) {
      const size_t d =
          size_t(std::upper_bound(share.begin(), share.end(), float(l) / act) - share.begin());
      out.layers[size_t(l)] = "cuda:" + std::to_string(std::min(d, share.size() - 1));
    }
  }
  for (int64_t l = 0; l < n_layers; ++l) out.experts[size_t(l)] = out.layers[size_t(l)];
  // -ot items: first match wins (std::regex_search on the tensor name).
  std::vector<std::pair<std::string, std::string>> items;
  size_t pos = 0;
  while (pos < ot.size()) {
    // Items are separated by commas outside the parentheses of the layer alternation.
    size_t end = pos;
    int depth = 0;
    while (end < ot.size() && !(ot[end] == ',' && depth == 0)) {
      if (ot[end] == '(') ++depth;
      if (ot[end] == ')') --depth;
      ++end;
    }
    const std::string it = ot.substr(pos, end - pos);
    const size_t eq = it.find('=');
    if (eq == std::string::npos) {
      throw Error("-ot list", "`" + it + "` is not pattern=buffer", "regenerate the file");
    }
    items.push_back({it.substr(0, eq), it.substr(eq + 1)});
    pos = end + 1;
  }
  for (int64_t l = 0; l < n_layers; ++l) {
    const std::string name = fmt::format("blk.{}.ffn_up_exps.weight", l);
    for (const auto& [pat, buft] : items) {
      if (!rule_pattern_matches(pat, name)) continue;
      if (buft == "CPU") {
        out.experts[size_t(l)] = "cpu";
      } else if (buft.rfind("CUDA", 0) == 0 && buft.size() > 4 &&
                 buft.find_first_not_of("0123456789", 4) == std::string::npos) {
        out.experts[size_t(l)] = "cuda:" + buft.substr(4);
      } else {
        throw Error("-ot list", "unknown buffer type `" + buft + "`", "use CPU or CUDAn");
      }
      break;
    }
  }
  return out;
}

std::vector<bool> read_llama_cpp_overrides(const std::string& text, int64_t n_layers) {
  std::string t = text;
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
  std::vector<bool> cpu(static_cast<size_t>(n_layers), false);
  if (t.empty()) return cpu;
  const std::string head = "blk\\.(", tail = ")\\.ffn_(up|down|gate)_exps\\.weight=CPU";
  if (t.rfind(head, 0) != 0 || t.size() < head.size() + tail.size() ||
      t.compare(t.size() - tail.size(), tail.size(), tail) != 0) {
    throw Error("-ot list", "`" + t + "` is not the form ktune writes",
                "expect blk\\.(a|b|...)\\.ffn_(up|down|gate)_exps\\.weight=CPU");
  }
  const std::string ids = t.substr(head.size(), t.size() - head.size() - tail.size());
  size_t pos = 0;
  while (pos <= ids.size()) {
    const size_t bar = std::min(ids.find('|', pos), ids.size());
    const std::string id = ids.substr(pos, bar - pos);
    if (id.empty() || id.find_first_not_of("0123456789") != std::string::npos ||
        std::stoll(id) >= n_layers) {
      throw Error("-ot list", "`" + id + "` is not a layer of this model", "regenerate the list");
    }
    cpu[size_t(std::stoll(id))] = true;
    pos = bar + 1;
  }
  return cpu;
}

// ------------------------------------------------------------------ rule pattern matching --

namespace {

struct PatternNode {
  enum Kind { Literal, Any, Group, Begin, End } kind = Literal;
  char c = 0;
  std::vector<std::vector<PatternNode>> alternatives;
  bool star = false;
};
using PatternSeq = std::vector<PatternNode>;

[[noreturn]] void bad_pattern(const std::string& p, const std::string& why) {
  throw Error("rule pattern `" + p + "`", why, "ktune reads only the patterns it writes");
}

PatternSeq parse_pattern(const std::string& p, size_t& i, bool in_group) {
  PatternSeq seq;
  while (i < p.size()) {
    const char ch = p[i];
    if (ch == '|' || ch == ')') {
      if (!in_group) bad_pattern(p, "unbalanced ')' or '|' outside a group");
      break;
    }
    PatternNode n;
    if (ch == '\\') {
      if (i + 1 >= p.size()) bad_pattern(p, "ends in a backslash");
      n.c = p[i + 1];
      i += 2;
    } else if (ch == '.') {
      n.kind = PatternNode::Any;
      ++i;
    } else if (ch == '^') {
      n.kind = PatternNode::Begin;
      ++i;
    } else if (ch == '$') {
      n.kind = PatternNode::End;
      ++i;
    } else if (ch == '(') {
      ++i;
      if (i < p.size() && p[i] == '?') bad_pattern(p, "has a (?...) construct");
      n.kind = PatternNode::Group;
      while (true) {
        n.alternatives.push_back(parse_pattern(p, i, true));
        if (i >= p.size()) bad_pattern(p, "has an unclosed group");
        if (p[i++] == ')') break;
      }
    } else if (ch == '[' || ch == '+' || ch == '?' || ch == '{' || ch == '*') {
      bad_pattern(p, std::string("uses '") + ch + "'");
    } else {
      n.c = ch;
      ++i;
    }
    if (i < p.size() && p[i] == '*') {
      n.star = true;
      ++i;
    }
    seq.push_back(std::move(n));
  }
  return seq;
}

using Cont = std::function<bool(size_t)>;
bool match_seq(const PatternSeq& s, size_t k, const std::string& t, size_t pos, const Cont& done);

bool match_once(const PatternNode& n, const std::string& t, size_t pos, const Cont& next) {
  switch (n.kind) {
    case PatternNode::Literal:
      return pos < t.size() && t[pos] == n.c && next(pos + 1);
    case PatternNode::Any:
      return pos < t.size() && next(pos + 1);
    case PatternNode::Begin:
      return pos == 0 && next(pos);
    case PatternNode::End:
      return pos == t.size() && next(pos);
    case PatternNode::Group:
      for (const PatternSeq& alt : n.alternatives) {
        if (match_seq(alt, 0, t, pos, next)) return true;
      }
      return false;
  }
  return false;
}

bool match_star(const PatternNode& n, const std::string& t, size_t pos, const Cont& next) {
  // Greedy: one more repetition that consumes input, else stop here.
  if (match_once(n, t, pos, [&](size_t p2) { return p2 > pos && match_star(n, t, p2, next); })) {
    return true;
  }
  return next(pos);
}

bool match_seq(const PatternSeq& s, size_t k, const std::string& t, size_t pos, const Cont& done) {
  if (k == s.size()) return done(pos);
  const Cont next = [&](size_t p2) { return match_seq(s, k + 1, t, p2, done); };
  return s[k].star ? match_star(s[k], t, pos, next) : match_once(s[k], t, pos, next);
}

}  // namespace

bool rule_pattern_matches(const std::string& pattern, const std::string& name) {
  size_t i = 0;
  const PatternSeq seq = parse_pattern(pattern, i, false);
  for (size_t start = 0; start <= name.size(); ++start) {  // re.search: any start position
    if (match_seq(seq, 0, name, start, [](size_t) { return true; })) return true;
  }
  return false;
}

namespace {

// Per layer: the generate_device of the first class-less rule whose name pattern matches
// `model.layers.L.<suffix>` (rules with a class never apply to these plain modules).
std::vector<std::string> first_rule_devices(const std::string& text, int64_t n_layers,
                                            const char* suffix, const std::string& none) {
  YAML::Node doc;
  try {
    doc = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw Error("rules", std::string("not valid YAML (") + e.what() + ")", "regenerate the file");
  }
  if (!doc.IsSequence()) throw Error("rules", "is not a list of rules", "regenerate the file");
  std::vector<std::string> out(static_cast<size_t>(n_layers), none);
  for (int64_t l = 0; l < n_layers; ++l) {
    const std::string name = fmt::format("model.layers.{}.{}", l, suffix);
    for (const YAML::Node& rule : doc) {
      const YAML::Node match = rule["match"];
      if (!match || !rule["replace"]) {
        throw Error("rules", "a rule lacks match or replace", "regenerate the file");
      }
      if (match["class"] || !match["name"]) continue;
      if (!rule_pattern_matches(match["name"].as<std::string>(), name)) continue;
      const YAML::Node kw = rule["replace"]["kwargs"];
      out[size_t(l)] = kw && kw["generate_device"] ? kw["generate_device"].as<std::string>()
                                                   : std::string("cuda:0");
      break;
    }
  }
  return out;
}

}  // namespace

std::vector<std::string> read_ktransformers_expert_devices(const std::string& text,
                                                           int64_t n_layers) {
  return first_rule_devices(text, n_layers, "mlp.experts", "");
}

std::vector<std::string> read_ktransformers_layer_devices(const std::string& text,
                                                          int64_t n_layers) {
  return first_rule_devices(text, n_layers, "self_attn", "cuda:0");
}

}  // namespace ktune::search
