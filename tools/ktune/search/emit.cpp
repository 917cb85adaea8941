// Writers and readers of what `ktune search` emits (search/emit.h).
#include "search/emit.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

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
  int64_t total = 0;
  for (const auto& row : c.on_gpu) total += static_cast<int64_t>(row.size());
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

std::string ktransformers_rules(const ModelInfo& model, const Candidate& c) {
  std::vector<int64_t> gpu, cpu;
  whole_layer_sets(c, gpu, cpu, "--emit ktransformers");
  const std::string dev = "cuda:0";
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

std::string llama_cpp_overrides(const Candidate& c) {
  std::vector<int64_t> gpu, cpu;
  whole_layer_sets(c, gpu, cpu, "--emit llama-cpp");
  if (cpu.empty()) return "";
  return "blk\\.(" + join_ids(cpu, "|") + ")\\.ffn_(up|down|gate)_exps\\.weight=CPU";
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

std::vector<std::string> read_ktransformers_expert_devices(const std::string& text,
                                                           int64_t n_layers) {
  YAML::Node doc;
  try {
    doc = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw Error("rules", std::string("not valid YAML (") + e.what() + ")", "regenerate the file");
  }
  if (!doc.IsSequence()) throw Error("rules", "is not a list of rules", "regenerate the file");
  std::vector<std::string> out(static_cast<size_t>(n_layers));
  for (int64_t l = 0; l < n_layers; ++l) {
    const std::string name = fmt::format("model.layers.{}.mlp.experts", l);
    for (const YAML::Node& rule : doc) {
      const YAML::Node match = rule["match"];
      if (!match || !rule["replace"]) {
        throw Error("rules", "a rule lacks match or replace", "regenerate the file");
      }
      // The experts module is a plain module list: rules that also match a class never apply.
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

}  // namespace ktune::search
