// Placement YAML: a strict reader (every error names file:line and the field), the resolver that
// expands layer entries against a model's shape, and the writer of the standard form.
//
// yaml-cpp is only used to build the node tree; every value is checked here, because its own
// conversions accept too much (0x10, "yes" as a bool) and report too little (no field name).
#include "ktune/engine/placement.h"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <utility>

#include "ktune/engine/atomic_file.h"
#include "ktune/engine/error.h"

namespace ktune {

// ------------------------------------------------------------------------------------- Device --

namespace {

constexpr int kMaxDeviceIndex = 1023;
const char* const kDeviceForms = "cpu, cpu:N (NUMA node N) or cuda:N (GPU N)";

// Canonical decimal (no sign, no leading zero unless "0"), at most kMaxDeviceIndex.
bool parse_device_index(const std::string& s, int* out) {
  if (s.empty() || s.size() > 4) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  if (s.size() > 1 && s[0] == '0') return false;
  const int v = std::atoi(s.c_str());
  if (v > kMaxDeviceIndex) return false;
  *out = v;
  return true;
}

}  // namespace

std::optional<Device> Device::try_parse(const std::string& text) {
  if (text == "cpu") return Device::cpu();
  int index = 0;
  if (text.rfind("cpu:", 0) == 0 && parse_device_index(text.substr(4), &index)) {
    return Device{Cpu, index};
  }
  if (text.rfind("cuda:", 0) == 0 && parse_device_index(text.substr(5), &index)) {
    return Device{Cuda, index};
  }
  return std::nullopt;
}

Device Device::parse(const std::string& text, const std::string& where) {
  if (std::optional<Device> d = try_parse(text)) return *d;
  std::string hint;
  if (text == "cuda" || text == "gpu" || text == "gpu:0") hint = " (did you mean cuda:0?)";
  throw Error(where, "`" + text + "` is not a device" + hint, "write " + std::string(kDeviceForms),
              ErrorKind::Usage);
}

std::string Device::to_string() const {
  if (kind == Cpu) return index < 0 ? "cpu" : "cpu:" + std::to_string(index);
  return "cuda:" + std::to_string(index);
}

bool operator==(const Device& a, const Device& b) { return a.kind == b.kind && a.index == b.index; }
bool operator!=(const Device& a, const Device& b) { return !(a == b); }
bool operator<(const Device& a, const Device& b) {
  if (a.kind != b.kind) return a.kind < b.kind;
  return a.index < b.index;
}

const char* moe_kernel_name(MoeKernel k) { return k == MoeKernel::Fused ? "fused" : "unfused"; }
const char* cpu_handoff_name(CpuHandoff h) {
  return h == CpuHandoff::Flags ? "flags" : "host_node";
}

std::string pcie_assist_text(int permille) {
  if (permille <= 0) return "off";
  // Three decimals (1000 + x keeps the leading zeros of x), then the trailing zeros dropped.
  std::string s =
      std::to_string(permille / 1000) + "." + std::to_string(1000 + permille % 1000).substr(1);
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s;
}

int parse_pcie_assist(const std::string& text, const std::string& where) {
  if (text == "off") return 0;
  char* end = nullptr;
  errno = 0;
  const double v = text.empty() ? -1 : std::strtod(text.c_str(), &end);
  if (errno != 0 || end == nullptr || *end != '\0' || !(v >= 0.0) ||
      v > kMaxPcieAssistPermille / 1000.0 + 1e-9) {
    throw Error(where, "`" + text + "` is not a share of the CPU experts in [0, 0.95] or off",
                "e.g. 0.375 (the GPU computes 3 of every 8 CPU experts), or off",
                ErrorKind::Usage);
  }
  return static_cast<int>(std::lround(v * 1000.0));
}

bool operator==(const LayerPlacement& a, const LayerPlacement& b) {
  return a.attention == b.attention && a.experts == b.experts;
}

// ------------------------------------------------------------------------------ id ranges -----

namespace {

// Limits for files read without a model: nothing real comes near them, and they keep a hostile
// file from expanding into gigabytes.
constexpr int64_t kMaxIdsWithoutModel = 65536;
constexpr int64_t kMaxExpandedIds = int64_t{1} << 20;  // over all entries of one file
constexpr size_t kMaxFileBytes = size_t{16} << 20;
constexpr int kMaxDepth = 32;
constexpr int64_t kMaxNodes = 200000;  // after alias expansion

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t')) --e;
  return s.substr(b, e - b);
}

// Parses a decimal id of at most 9 digits (so it fits any int64 arithmetic below).
bool parse_id(const std::string& s, int64_t* out) {
  if (s.empty() || s.size() > 9) return false;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  *out = v;
  return true;
}

// The shared core of parse_id_ranges: `fail` receives the problem text and must throw.
std::vector<int64_t> parse_ranges(const std::string& text, int64_t limit, const std::string& what,
                                  const std::function<void(const std::string&)>& fail) {
  const std::string valid = " (write ids or ranges separated by commas, e.g. \"0-15,20\"; valid " +
                            what + "s: 0-" + std::to_string(limit - 1) + ")";
  std::vector<int64_t> ids;
  if (trim(text).empty()) fail("is empty" + valid);
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string::npos) comma = text.size();
    const std::string item = trim(text.substr(pos, comma - pos));
    if (item.empty()) fail("`" + text + "` has an empty item" + valid);
    const size_t dash = item.find('-');
    int64_t a = 0, b = 0;
    if (dash == std::string::npos) {
      if (!parse_id(item, &a)) fail("`" + item + "` is not a " + what + " id" + valid);
      b = a;
    } else {
      const std::string lo = trim(item.substr(0, dash)), hi = trim(item.substr(dash + 1));
      if (!parse_id(lo, &a) || !parse_id(hi, &b)) {
        fail("`" + item + "` is not a range of " + what + " ids" + valid);
      }
      if (a > b) fail("range `" + item + "` runs backwards" + valid);
    }
    if (b >= limit) {
      fail(what + " " + std::to_string(b) + " is out of range" + valid);
    }
    for (int64_t v = a; v <= b; ++v) ids.push_back(v);
    pos = comma + 1;
  }
  std::sort(ids.begin(), ids.end());
  const auto dup = std::adjacent_find(ids.begin(), ids.end());
  if (dup != ids.end()) {
    fail(what + " " + std::to_string(*dup) + " appears twice in `" + text + "`");
  }
  return ids;
}

}  // namespace

std::vector<int64_t> parse_id_ranges(const std::string& text, int64_t limit,
                                     const std::string& where, const std::string& what) {
  return parse_ranges(text, limit, what, [&](const std::string& problem) {
    throw Error(where, problem, "fix the " + what + " list", ErrorKind::Usage);
  });
}

std::string format_id_ranges(const std::vector<int64_t>& ids) {
  std::string out;
  size_t i = 0;
  while (i < ids.size()) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += std::to_string(ids[i]);
    if (j > i) out += '-' + std::to_string(ids[j]);
    i = j + 1;
  }
  return out;
}

// ---------------------------------------------------------------------------------- parser -----

namespace {

const char* const kTopKeys[] = {"ktune", "model", "runtime", "layers", "predicted", "searched_on"};
const char* const kModelKeys[] = {"path", "arch"};
const char* const kRuntimeKeys[] = {"cuda_graph", "moe_kernel", "cpu_handoff",  "cpu_threads",
                                    "context",    "batch",      "gpu_transport", "pcie_assist"};
const char* const kEntryKeys[] = {"layers", "attention", "experts"};
const char* const kPredictedKeys[] = {"decode_tok_s", "prefill_tok_s", "memory_gib"};
const char* const kSearchedKeys[] = {"profile", "router_stats"};

template <size_t N>
std::string join_keys(const char* const (&keys)[N]) {
  std::string s;
  for (size_t i = 0; i < N; ++i) s += (i ? ", " : "") + std::string(keys[i]);
  return s;
}

// Finds the deepest nesting of flow collections before yaml-cpp sees the text, so a document of
// thousands of '[' never reaches its recursive parser. Quotes are honoured only where a quoted
// scalar can start; block nesting is bounded by yaml-cpp's own depth guard and the walk below.
void check_flow_depth(const std::string& text, const std::string& file) {
  int depth = 0, line = 1;
  char quote = 0;
  bool comment = false, escaped = false;
  char prev = '\n';
  for (char c : text) {
    if (c == '\n') {
      ++line;
      comment = false;  // quoted scalars may span lines: `quote` stays
    } else if (comment) {
      continue;
    } else if (quote) {
      if (c == quote && !escaped) quote = 0;
      escaped = quote == '"' && c == '\\' && !escaped;
    } else if ((c == '"' || c == '\'') && prev != 0 && std::strchr(" \t\n[{,:", prev)) {
      quote = c;
    } else if (c == '#' && (prev == ' ' || prev == '\t' || prev == '\n')) {
      comment = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxDepth) {
        throw Error(file + ":" + std::to_string(line),
                    "document: nested deeper than " + std::to_string(kMaxDepth) + " levels",
                    "a placement file is a few levels deep; check that this is the right file");
      }
    } else if (c == ']' || c == '}') {
      if (depth > 0) --depth;
    }
    prev = c == '\n' ? '\n' : c;
  }
}

// Counts the documents of a YAML stream (the caller stops at two). yaml-cpp 0.7's LoadAll loops
// forever, allocating, on streams such as "," (jbeder/yaml-cpp#1040, fixed by #1319 in 0.8.x):
// the parser reports an empty document without consuming the token. Stopping at two documents
// is all the placement reader needs, and terminates on every version.
class DocumentCounter : public YAML::EventHandler {
 public:
  void OnDocumentStart(const YAML::Mark& mark) override {
    if (count++ == 1) second = mark;
  }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark& m, YAML::anchor_t) override { node(m); }
  void OnAlias(const YAML::Mark& m, YAML::anchor_t) override { node(m); }
  void OnScalar(const YAML::Mark& m, const std::string&, YAML::anchor_t,
                const std::string&) override {
    node(m);
  }
  void OnSequenceStart(const YAML::Mark& m, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {
    node(m);
  }
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark& m, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {
    node(m);
  }
  void OnMapEnd() override {}

  int count = 0;
  // Where the second document's root node starts (else the document itself), for the message.
  YAML::Mark second = YAML::Mark::null_mark();

 private:
  void node(const YAML::Mark& m) {
    if (count == 2 && !second_node) {
      second_node = true;
      if (!m.is_null()) second = m;
    }
  }
  bool second_node = false;
};

class Parser {
 public:
  Parser(std::string file, const ModelConfig* cfg) : file_(std::move(file)), cfg_(cfg) {}

  Placement parse(const std::string& text);

 private:
  using Fields = std::map<std::string, std::pair<YAML::Node, YAML::Node>>;

  int line_of(const YAML::Node& n) const {
    const YAML::Mark m = n.Mark();
    return m.is_null() ? 0 : m.line + 1;
  }
  std::string where(int line) const {
    return line > 0 ? file_ + ":" + std::to_string(line) : file_;
  }
  [[noreturn]] void fail(int line, const std::string& field, const std::string& problem,
                         const std::string& fix) const {
    throw Error(where(line), field + ": " + problem, fix);
  }
  [[noreturn]] void fail(const YAML::Node& n, const std::string& field, const std::string& problem,
                         const std::string& fix) const {
    fail(line_of(n), field, problem, fix);
  }

  void check_shape(const YAML::Node& n, int depth, int64_t* nodes) const;
  template <size_t N>
  Fields read_map(const YAML::Node& n, const std::string& field, const char* const (&keys)[N],
                  const std::string& example) const;
  std::string read_string(const YAML::Node& n, const std::string& field) const;
  int64_t read_int(const YAML::Node& n, const std::string& field, int64_t lo, int64_t hi) const;
  bool read_bool(const YAML::Node& n, const std::string& field) const;
  double read_number(const YAML::Node& n, const std::string& field) const;
  Device read_device(const YAML::Node& n, const std::string& field) const;
  std::vector<int64_t> read_ids(const YAML::Node& n, const std::string& field, int64_t limit,
                                const std::string& what);
  LayerEntry read_entry(const YAML::Node& n, const std::string& field);

  std::string file_;
  const ModelConfig* cfg_;
  int64_t expanded_ids_ = 0;
};

void Parser::check_shape(const YAML::Node& n, int depth, int64_t* nodes) const {
  if (depth > kMaxDepth) {
    fail(n, "document", "nested deeper than " + std::to_string(kMaxDepth) + " levels",
         "a placement file is a few levels deep; check that this is the right file");
  }
  if (++*nodes > kMaxNodes) {
    fail(n, "document",
         "has more than " + std::to_string(kMaxNodes) + " values once aliases are expanded",
         "write the placement without anchors and aliases (*name), or with fewer of them");
  }
  if (n.IsMap()) {
    for (auto it = n.begin(); it != n.end(); ++it) {
      check_shape(it->first, depth + 1, nodes);
      check_shape(it->second, depth + 1, nodes);
    }
  } else if (n.IsSequence()) {
    for (auto it = n.begin(); it != n.end(); ++it) check_shape(*it, depth + 1, nodes);
  }
}

std::string type_name(const YAML::Node& n) {
  if (n.IsMap()) return "a map";
  if (n.IsSequence()) return "a list";
  if (n.IsScalar()) return "`" + n.Scalar() + "`";
  return "empty";
}

template <size_t N>
Parser::Fields Parser::read_map(const YAML::Node& n, const std::string& field,
                                const char* const (&keys)[N], const std::string& example) const {
  if (!n.IsMap()) {
    fail(n, field, "must be a map like " + example + ", not " + type_name(n),
         "see docs/placement.md for the format");
  }
  Fields out;
  for (auto it = n.begin(); it != n.end(); ++it) {
    const YAML::Node k = it->first;
    if (!k.IsScalar()) {
      fail(k, field.empty() ? "document" : field,
           "has a key that is " + type_name(k) + ", not a name",
           "keys are plain names: " + join_keys(keys));
    }
    const std::string key = k.Scalar();
    const std::string sub = field.empty() ? key : field + "." + key;
    if (std::find_if(std::begin(keys), std::end(keys), [&](const char* s) { return key == s; }) ==
        std::end(keys)) {
      fail(k, field.empty() ? "document" : field, "unknown key `" + key + "`",
           "valid keys here: " + join_keys(keys));
    }
    if (out.count(key)) {
      fail(k, sub, "appears twice (first at line " + std::to_string(line_of(out[key].first)) + ")",
           "keep one of them");
    }
    out[key] = {k, it->second};
  }
  return out;
}

std::string Parser::read_string(const YAML::Node& n, const std::string& field) const {
  if (!n.IsScalar()) {
    fail(n, field, "must be a text value, not " + type_name(n), "see docs/placement.md");
  }
  return n.Scalar();
}

// Plain (unquoted) scalars only: `context: "4096"` is a string in YAML, and accepting it would
// make the writer's output differ from what the user meant.
int64_t Parser::read_int(const YAML::Node& n, const std::string& field, int64_t lo,
                         int64_t hi) const {
  const std::string range = std::to_string(lo) + " to " + std::to_string(hi);
  if (!n.IsScalar() || n.Tag() != "?") {
    fail(n, field,
         "must be a whole number, not " + type_name(n) + (n.Tag() == "!" ? " (quoted)" : ""),
         "write a number from " + range);
  }
  const std::string& s = n.Scalar();
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  const bool digits = !s.empty() && s.find_first_not_of("+-0123456789") == std::string::npos;
  if (!digits || end != s.c_str() + s.size() || errno == ERANGE) {
    fail(n, field, "`" + s + "` is not a whole number", "write a number from " + range);
  }
  if (v < lo || v > hi) {
    fail(n, field, std::to_string(v) + " is out of range", "write a number from " + range);
  }
  return v;
}

bool Parser::read_bool(const YAML::Node& n, const std::string& field) const {
  if (n.IsScalar() && n.Tag() == "?") {
    const std::string& s = n.Scalar();
    if (s == "true" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "False" || s == "FALSE") return false;
  }
  fail(n, field, "must be true or false, not " + type_name(n), "write true or false");
}

double Parser::read_number(const YAML::Node& n, const std::string& field) const {
  if (n.IsScalar() && n.Tag() == "?") {
    const std::string& s = n.Scalar();
    errno = 0;
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    const bool plain = !s.empty() && s.find_first_not_of("+-.0123456789eE") == std::string::npos;
    if (plain && end == s.c_str() + s.size() && std::isfinite(v) && v >= 0) return v;
  }
  fail(n, field, "must be a number >= 0, not " + type_name(n), "write e.g. 12.5");
}

Device Parser::read_device(const YAML::Node& n, const std::string& field) const {
  if (n.IsScalar()) {
    if (std::optional<Device> d = Device::try_parse(n.Scalar())) return *d;
  }
  std::string hint;
  if (n.IsScalar() && (n.Scalar() == "cuda" || n.Scalar() == "gpu"))
    hint = " (did you mean cuda:0?)";
  fail(n, field, type_name(n) + " is not a device" + hint, std::string("write ") + kDeviceForms);
}

// An id set: an int, a range string ("0-15,20") or a list of ints / range strings.
std::vector<int64_t> Parser::read_ids(const YAML::Node& n, const std::string& field, int64_t limit,
                                      const std::string& what) {
  auto fail_here = [&](const YAML::Node& at) {
    return [this, at, field, what](const std::string& problem) {
      fail(at, field, problem, "fix the " + what + " ids");
    };
  };
  std::vector<int64_t> ids;
  if (n.IsScalar()) {
    ids = parse_ranges(n.Scalar(), limit, what, fail_here(n));
  } else if (n.IsSequence()) {
    if (n.size() == 0) fail(n, field, "is an empty list", "name at least one " + what);
    for (auto it = n.begin(); it != n.end(); ++it) {
      if (!it->IsScalar()) {
        fail(*it, field, "has an item that is " + type_name(*it) + ", not an id",
             "list ids (e.g. [3, 17, 42]) or write ranges as a string (\"0-15,20\")");
      }
      std::vector<int64_t> part = parse_ranges(it->Scalar(), limit, what, fail_here(*it));
      ids.insert(ids.end(), part.begin(), part.end());
    }
    std::sort(ids.begin(), ids.end());
    const auto dup = std::adjacent_find(ids.begin(), ids.end());
    if (dup != ids.end()) {
      fail(n, field, what + " " + std::to_string(*dup) + " appears twice", "list it once");
    }
  } else {
    fail(n, field, "must be " + what + " ids (e.g. \"0-15,20\" or [3, 17]), not " + type_name(n),
         "see docs/placement.md");
  }
  expanded_ids_ += static_cast<int64_t>(ids.size());
  if (expanded_ids_ > kMaxExpandedIds) {
    fail(n, field, "the file names more than " + std::to_string(kMaxExpandedIds) + " ids in all",
         "use `all` or `rest` instead of long lists");
  }
  return ids;
}

LayerEntry Parser::read_entry(const YAML::Node& n, const std::string& field) {
  const Fields f = read_map(n, field, kEntryKeys,
                            "{layers: \"0-23\", attention: cuda:0, experts: {cuda:0: all}}");
  LayerEntry e;
  e.line = line_of(n);
  auto it = f.find("layers");
  if (it == f.end()) {
    fail(n, field + ".layers", "missing",
         "say which layers the entry is for, e.g. layers: \"0-23\"");
  }
  const int64_t layer_limit = cfg_ ? cfg_->n_layers : kMaxIdsWithoutModel;
  e.layers_line = line_of(it->second.first);
  e.layers = read_ids(it->second.second, field + ".layers", layer_limit, "layer");
  if ((it = f.find("attention")) != f.end()) {
    e.attention = read_device(it->second.second, field + ".attention");
  }
  if ((it = f.find("experts")) != f.end()) {
    const YAML::Node& ex = it->second.second;
    const std::string ef = field + ".experts";
    if (!ex.IsMap() || ex.size() == 0) {
      fail(ex, ef,
           ex.IsMap() ? std::string("is empty")
                      : "must be a map from device to experts, not " + type_name(ex),
           "e.g. experts: {cuda:0: \"0-15\", cpu: rest}");
    }
    const int64_t expert_limit = cfg_ ? cfg_->n_experts : kMaxIdsWithoutModel;
    std::map<int64_t, Device> owner;
    for (auto kv = ex.begin(); kv != ex.end(); ++kv) {
      ExpertRule r;
      r.device = read_device(kv->first, ef);
      r.line = line_of(kv->first);
      const std::string rf = ef + "." + r.device.to_string();
      for (const ExpertRule& o : e.experts) {
        if (o.device == r.device) {
          fail(kv->first, rf, "appears twice (first at line " + std::to_string(o.line) + ")",
               "give each device one key");
        }
      }
      const YAML::Node v = kv->second;
      if (v.IsScalar() && (v.Scalar() == "all" || v.Scalar() == "rest")) {
        r.kind = v.Scalar() == "all" ? ExpertRule::All : ExpertRule::Rest;
        for (const ExpertRule& o : e.experts) {
          if (r.kind == ExpertRule::Rest && o.kind == ExpertRule::Rest) {
            fail(v, rf, "`rest` is already given to " + o.device.to_string(),
                 "give `rest` to one device only");
          }
        }
      } else {
        r.kind = ExpertRule::List;
        r.ids = read_ids(v, rf, expert_limit, "expert");
        for (int64_t id : r.ids) {
          auto [pos, fresh] = owner.emplace(id, r.device);
          if (!fresh) {
            fail(v, rf,
                 "expert " + std::to_string(id) + " is also given to " + pos->second.to_string(),
                 "put each expert on one device");
          }
        }
      }
      e.experts.push_back(r);
    }
    for (const ExpertRule& r : e.experts) {
      if (r.kind == ExpertRule::All && e.experts.size() > 1) {
        fail(r.line, ef + "." + r.device.to_string(),
             "`all` puts every expert on " + r.device.to_string() +
                 ", so no other device may be named in this entry",
             "use `rest` to give the remaining experts to a device");
      }
    }
  }
  return e;
}

Placement Parser::parse(const std::string& text) {
  if (text.size() > kMaxFileBytes) {
    throw Error(file_, "the file is " + std::to_string(text.size() >> 20) + " MiB",
                "a placement file is a few KiB; check that this is the right file");
  }
  // YAML text has no NUL byte; a file with one is binary (a model passed as --config, say),
  // whose bytes would only make a confusing syntax or nesting error.
  if (text.find('\0') != std::string::npos) {
    std::string head = text.substr(0, 4);
    for (char& c : head) c = std::isprint(static_cast<unsigned char>(c)) ? c : '?';
    throw Error(file_, "a binary file (it starts with '" + head + "'), not a placement YAML",
                "pass a placement YAML (docs/placement.md); a model goes to --model");
  }
  check_flow_depth(text, file_);
  YAML::Node root;
  DocumentCounter counter;
  try {
    root = YAML::Load(text);  // the first document (not LoadAll: see DocumentCounter)
    if (!root.IsNull()) {
      std::istringstream in(text);
      YAML::Parser parser(in);
      while (counter.count < 2 && parser.HandleNextDocument(counter)) {
      }
    }
  } catch (const YAML::Exception& e) {
    const int line = e.mark.is_null() ? 0 : e.mark.line + 1;
    throw Error(where(line), "not valid YAML: " + e.msg,
                "fix the syntax there (see docs/placement.md for the format)");
  }
  if (root.IsNull()) {
    throw Error(file_, "the file is empty",
                "a placement needs at least `ktune: 1`, `model: {path: ...}` and `layers:`");
  }
  if (counter.count > 1) {
    fail(counter.second.is_null() ? 0 : counter.second.line + 1, "document",
         "the file holds more than one YAML document", "keep one placement per file");
  }
  int64_t nodes = 0;
  check_shape(root, 0, &nodes);
  if (!root.IsMap()) {
    fail(root, "document", "must be a map (ktune:, model:, layers:, ...), not " + type_name(root),
         "see docs/placement.md for the format");
  }
  const Fields top = read_map(root, "", kTopKeys, "{ktune: 1, model: ..., layers: ...}");
  Placement p;
  p.file = file_;

  auto it = top.find("ktune");
  if (it == top.end()) {
    fail(root, "ktune", "missing (it holds the format version)",
         "start the file with `ktune: " + std::to_string(kPlacementVersion) + "`");
  }
  {
    const YAML::Node& v = it->second.second;
    const int64_t version = read_int(v, "ktune", -1000000, 1000000);
    if (version > kPlacementVersion) {
      fail(v, "ktune",
           std::to_string(version) + " is newer than this ktune supports (" +
               std::to_string(kPlacementVersion) + ")",
           "upgrade ktune");
    }
    if (version < 1) {
      fail(v, "ktune", std::to_string(version) + " is not a placement format version",
           "write `ktune: " + std::to_string(kPlacementVersion) + "`");
    }
    p.version = static_cast<int>(version);
  }

  it = top.find("model");
  if (it == top.end()) {
    fail(root, "model.path", "missing", "name the model: model: {path: model.gguf}");
  }
  {
    const Fields m = read_map(it->second.second, "model", kModelKeys, "{path: model.gguf}");
    auto pit = m.find("path");
    if (pit == m.end()) {
      fail(it->second.second, "model.path", "missing",
           "name the model: model: {path: model.gguf} (relative to this file's folder)");
    }
    p.model_path = read_string(pit->second.second, "model.path");
    if (p.model_path.empty()) {
      fail(pit->second.second, "model.path", "is empty", "name a GGUF file or a synth: model");
    }
    if ((pit = m.find("arch")) != m.end()) {
      p.arch = read_string(pit->second.second, "model.arch");
      p.arch_line = line_of(pit->second.second);
      if (p.arch.empty()) fail(pit->second.second, "model.arch", "is empty", "e.g. qwen3moe");
    }
  }

  if ((it = top.find("runtime")) != top.end()) {
    const Fields r =
        read_map(it->second.second, "runtime", kRuntimeKeys, "{cuda_graph: true, context: 4096}");
    RuntimeOptions& o = p.runtime;
    for (const auto& [key, kv] : r) {
      const YAML::Node& v = kv.second;
      const std::string f = "runtime." + key;
      if (key == "cuda_graph") {
        o.cuda_graph = read_bool(v, f);
      } else if (key == "moe_kernel") {
        const std::string s = v.IsScalar() ? v.Scalar() : "";
        if (s == "fused") {
          o.moe_kernel = MoeKernel::Fused;
        } else if (s == "unfused") {
          o.moe_kernel = MoeKernel::Unfused;
        } else {
          fail(v, f, type_name(v) + " is not a MoE kernel", "write fused or unfused");
        }
      } else if (key == "cpu_handoff") {
        const std::string s = v.IsScalar() ? v.Scalar() : "";
        if (s == "flags") {
          o.cpu_handoff = CpuHandoff::Flags;
        } else if (s == "host_node") {
          o.cpu_handoff = CpuHandoff::HostNode;
        } else {
          fail(v, f, type_name(v) + " is not a hand-off mechanism", "write flags or host_node");
        }
      } else if (key == "cpu_threads") {
        o.cpu_threads = static_cast<int>(read_int(v, f, 0, 4096));
      } else if (key == "context") {
        o.context = read_int(v, f, 1, int64_t{1} << 24);
      } else if (key == "batch") {
        o.batch = read_int(v, f, 1, 4096);
      } else if (key == "gpu_transport") {
        const std::string s = v.IsScalar() ? v.Scalar() : "";
        if (s == "auto" || s == "nccl" || s == "peer") {
          o.gpu_transport = parse_gpu_transport(s, f);
        } else {
          fail(v, f, type_name(v) + " is not a GPU transport", "write auto, nccl or peer");
        }
      } else if (key == "pcie_assist") {
        const std::string s = v.IsScalar() ? v.Scalar() : "";
        try {
          o.pcie_assist_permille = parse_pcie_assist(s, f);
        } catch (const Error&) {
          fail(v, f, type_name(v) + " is not a share of the CPU experts",
               "write a number from 0 to 0.95 (e.g. 0.375), or off");
        }
      }
    }
  }

  it = top.find("layers");
  if (it == top.end() || it->second.second.IsNull()) {
    fail(it == top.end() ? root : it->second.first, "layers", "missing",
         "list the layer entries, e.g. layers: [{layers: \"0-47\", attention: cuda:0, "
         "experts: {cuda:0: all}}]");
  }
  {
    const YAML::Node& ls = it->second.second;
    if (!ls.IsSequence()) {
      fail(ls, "layers", "must be a list of entries, not " + type_name(ls),
           "write `- {layers: \"0-23\", attention: cuda:0, experts: {cuda:0: all}}` items");
    }
    std::map<int64_t, size_t> seen;  // layer -> entry index
    for (size_t i = 0; i < ls.size(); ++i) {
      const std::string field = "layers[" + std::to_string(i) + "]";
      LayerEntry e = read_entry(ls[i], field);
      for (int64_t l : e.layers) {
        auto [pos, fresh] = seen.emplace(l, i);
        if (!fresh) {
          const LayerEntry& first = p.entries[pos->second];
          fail(e.layers_line, field + ".layers",
               "layer " + std::to_string(l) + " is already placed by layers[" +
                   std::to_string(pos->second) + "] at line " + std::to_string(first.line),
               "put each layer in one entry");
        }
      }
      p.entries.push_back(std::move(e));
    }
  }

  if ((it = top.find("predicted")) != top.end()) {
    const Fields f = read_map(it->second.second, "predicted", kPredictedKeys,
                              "{decode_tok_s: 0.0, memory_gib: {cuda:0: 0.0}}");
    Predicted pr;
    for (const auto& [key, kv] : f) {
      const std::string field = "predicted." + key;
      if (key == "decode_tok_s") pr.decode_tok_s = read_number(kv.second, field);
      if (key == "prefill_tok_s") pr.prefill_tok_s = read_number(kv.second, field);
      if (key == "memory_gib") {
        const YAML::Node& mg = kv.second;
        if (!mg.IsMap()) {
          fail(mg, field, "must be a map from device to GiB, not " + type_name(mg),
               "e.g. memory_gib: {cuda:0: 17.5, cpu: 2.0}");
        }
        for (auto m = mg.begin(); m != mg.end(); ++m) {
          const Device d = read_device(m->first, field);
          if (pr.memory_gib.count(d)) {
            fail(m->first, field + "." + d.to_string(), "appears twice", "keep one");
          }
          pr.memory_gib[d] = read_number(m->second, field + "." + d.to_string());
        }
      }
    }
    p.predicted = pr;
  }

  if ((it = top.find("searched_on")) != top.end()) {
    const Fields f = read_map(it->second.second, "searched_on", kSearchedKeys,
                              "{profile: profile.json, router_stats: sha256:...}");
    SearchedOn s;
    for (const auto& [key, kv] : f) {
      const std::string v = read_string(kv.second, "searched_on." + key);
      (key == "profile" ? s.profile : s.router_stats) = v;
    }
    p.searched_on = s;
  }

  // The model path is relative to the file's folder, so a placement can travel with its model.
  if (p.model_path.rfind("synth:", 0) == 0) {
    p.model_resolved = p.model_path;
  } else {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::path mp(p.model_path);
    if (mp.is_relative()) {
      fs::path base = fs::path(file_).parent_path();
      if (base.empty() || base.is_relative()) {
        const fs::path cwd = fs::current_path(ec);
        base = ec ? base : cwd / base;
      }
      mp = base / mp;
    }
    p.model_resolved = mp.lexically_normal().string();
  }
  return p;
}

}  // namespace

Placement parse_placement(const std::string& yaml_text, const std::string& file_name,
                          const ModelConfig* cfg) {
  Parser parser(file_name.empty() ? "<placement>" : file_name, cfg);
  Placement p = parser.parse(yaml_text);
  p.file = file_name;
  if (cfg != nullptr) resolve_placement(p, *cfg);
  return p;
}

Placement load_placement(const std::string& path, const ModelConfig* cfg) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) {
    throw Error(path, "cannot read the placement file (" + ec.message() + ")",
                "check the path given to --config");
  }
  if (size > kMaxFileBytes) {
    throw Error(path, "the file is " + std::to_string(size >> 20) + " MiB",
                "a placement file is a few KiB; check that this is the right file");
  }
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (!in) {
    throw Error(path, "cannot read the placement file", "check the path and its permissions");
  }
  return parse_placement(ss.str(), path, cfg);
}

// ------------------------------------------------------------------------------- Placement -----

Device Placement::default_attention() const {
  std::optional<Device> best;
  for (const LayerEntry& e : entries) {
    if (e.attention && e.attention->is_gpu() && (!best || *e.attention < *best)) {
      best = e.attention;
    }
    for (const ExpertRule& r : e.experts) {
      if (r.device.is_gpu() && (!best || r.device < *best)) best = r.device;
    }
  }
  return best ? *best : Device::cpu();
}

std::vector<Device> Placement::devices() const {
  std::set<Device> s;
  for (const LayerPlacement& l : layers) {
    s.insert(l.attention);
    s.insert(l.experts.begin(), l.experts.end());
  }
  return {s.begin(), s.end()};
}

void resolve_placement(Placement& p, const ModelConfig& cfg) {
  const std::string file = p.file.empty() ? "<placement>" : p.file;
  auto where = [&](int line) { return line > 0 ? file + ":" + std::to_string(line) : file; };
  if (!p.arch.empty() && p.arch != cfg.arch) {
    throw Error(where(p.arch_line),
                "model.arch: the file says " + p.arch + " but the model is " + cfg.arch,
                "point model.path at the model this placement was made for, or fix model.arch");
  }
  const int64_t nl = cfg.n_layers, ne = cfg.n_experts;
  if (!p.layers.empty()) {
    // Built in code or resolved before: check the shape only, so that layers changed since (by
    // the search, say) are never overwritten by the entries they came from.
    bool ok = p.n_layers() == nl;
    for (const LayerPlacement& l : p.layers) ok = ok && int64_t(l.experts.size()) == ne;
    if (!ok) {
      throw Error(file, "the placement is for another model shape",
                  "the model has " + std::to_string(nl) + " layers of " + std::to_string(ne) +
                      " experts; rebuild the placement for it");
    }
    return;
  }
  for (size_t i = 0; i < p.entries.size(); ++i) {
    const LayerEntry& e = p.entries[i];
    const std::string field = "layers[" + std::to_string(i) + "]";
    for (int64_t l : e.layers) {
      if (l >= nl) {
        throw Error(
            where(e.layers_line),
            field + ".layers: layer " + std::to_string(l) + " is out of range",
            "the model has " + std::to_string(nl) + " layers (0-" + std::to_string(nl - 1) + ")");
      }
    }
    for (const ExpertRule& r : e.experts) {
      for (int64_t id : r.ids) {
        if (id >= ne) {
          throw Error(where(r.line),
                      field + ".experts." + r.device.to_string() + ": expert " +
                          std::to_string(id) + " is out of range",
                      "the model has " + std::to_string(ne) + " experts per layer (0-" +
                          std::to_string(ne - 1) + ")");
        }
      }
    }
  }
  const Device att = p.default_attention();
  p.layers.assign(static_cast<size_t>(nl),
                  LayerPlacement{att, std::vector<Device>(static_cast<size_t>(ne), Device::cpu())});
  for (const LayerEntry& e : p.entries) {
    LayerPlacement lp{e.attention.value_or(att),
                      std::vector<Device>(static_cast<size_t>(ne), Device::cpu())};
    std::vector<bool> named(static_cast<size_t>(ne), false);
    for (const ExpertRule& r : e.experts) {
      if (r.kind != ExpertRule::List) continue;
      for (int64_t id : r.ids) {
        lp.experts[size_t(id)] = r.device;
        named[size_t(id)] = true;
      }
    }
    for (const ExpertRule& r : e.experts) {
      if (r.kind == ExpertRule::List) continue;
      for (int64_t x = 0; x < ne; ++x) {
        if (r.kind == ExpertRule::All || !named[size_t(x)]) lp.experts[size_t(x)] = r.device;
      }
    }
    for (int64_t l : e.layers) p.layers[size_t(l)] = lp;
  }
}

namespace {

// What an unresolved entry means, for equality of placements read without a model.
bool same_entries(const std::vector<LayerEntry>& a, const std::vector<LayerEntry>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].layers != b[i].layers || a[i].attention != b[i].attention) return false;
    if (a[i].experts.size() != b[i].experts.size()) return false;
    for (size_t j = 0; j < a[i].experts.size(); ++j) {
      const ExpertRule &x = a[i].experts[j], &y = b[i].experts[j];
      if (x.device != y.device || x.kind != y.kind || x.ids != y.ids) return false;
    }
  }
  return true;
}

bool same_runtime(const RuntimeOptions& a, const RuntimeOptions& b) {
  return a.cuda_graph == b.cuda_graph && a.moe_kernel == b.moe_kernel &&
         a.cpu_handoff == b.cpu_handoff && a.cpu_threads == b.cpu_threads &&
         a.context == b.context && a.batch == b.batch && a.gpu_transport == b.gpu_transport &&
         a.pcie_assist_permille == b.pcie_assist_permille;
}

}  // namespace

bool operator==(const Placement& a, const Placement& b) {
  if (a.version != b.version || a.model_path != b.model_path || a.arch != b.arch) return false;
  if (!same_runtime(a.runtime, b.runtime)) return false;
  if (a.resolved() != b.resolved()) return false;
  if (a.resolved() ? a.layers != b.layers : !same_entries(a.entries, b.entries)) return false;
  if (a.predicted.has_value() != b.predicted.has_value()) return false;
  if (a.predicted && (a.predicted->decode_tok_s != b.predicted->decode_tok_s ||
                      a.predicted->prefill_tok_s != b.predicted->prefill_tok_s ||
                      a.predicted->memory_gib != b.predicted->memory_gib)) {
    return false;
  }
  if (a.searched_on.has_value() != b.searched_on.has_value()) return false;
  return !a.searched_on || (a.searched_on->profile == b.searched_on->profile &&
                            a.searched_on->router_stats == b.searched_on->router_stats);
}
bool operator!=(const Placement& a, const Placement& b) { return !(a == b); }

// ---------------------------------------------------------------------------------- writer -----

namespace {

// Plain when YAML cannot read it as anything but this string; double-quoted otherwise.
std::string yaml_scalar(const std::string& s) {
  bool plain = !s.empty() && s.size() < 4096;
  for (size_t i = 0; plain && i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const bool ok =
        std::isalnum(c) || c == '_' || c == '.' || c == '/' || (i > 0 && (c == '-' || c == '+'));
    plain = ok;
  }
  if (plain) {
    // Words and numbers YAML would read as another type stay quoted.
    static const char* const special[] = {"true", "false", "null", "yes", "no", "on",
                                          "off",  "y",     "n",    "nan", "inf"};
    std::string low;
    for (char c : s) low += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    for (const char* w : special) plain = plain && low != w && low != std::string(".") + w;
    char* end = nullptr;
    std::strtod(s.c_str(), &end);
    if (end == s.c_str() + s.size()) plain = false;
    if (std::isdigit(static_cast<unsigned char>(s[0]))) plain = false;  // 0x1f, 1_000, 12:30
  }
  if (plain) return s;
  std::string out = "\"";
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

// The shortest text that reads back as the same double.
std::string format_number(double v) {
  char buf[40];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

void check_writable(const Placement& p) {
  if (!p.resolved()) {
    throw Error(p.file.empty() ? "placement" : p.file, "cannot be written before it is resolved",
                "parse it with the model's config (or call resolve_placement) first");
  }
  for (const LayerPlacement& l : p.layers) {
    if (l.experts.size() != p.layers[0].experts.size() || l.experts.empty()) {
      throw Error(p.file.empty() ? "placement" : p.file, "layers have different expert counts",
                  "every layer needs one device per expert");
    }
  }
}

std::string experts_map(const LayerPlacement& l) {
  std::map<Device, std::vector<int64_t>> by_device;
  for (size_t e = 0; e < l.experts.size(); ++e) {
    by_device[l.experts[e]].push_back(static_cast<int64_t>(e));
  }
  if (by_device.size() == 1) return "{" + by_device.begin()->first.to_string() + ": all}";
  // The device with the most experts takes `rest` (first in device order on ties), written last.
  auto rest = by_device.begin();
  for (auto it = by_device.begin(); it != by_device.end(); ++it) {
    if (it->second.size() > rest->second.size()) rest = it;
  }
  std::string out = "{";
  for (auto it = by_device.begin(); it != by_device.end(); ++it) {
    if (it == rest) continue;
    out += it->first.to_string() + ": \"" + format_id_ranges(it->second) + "\", ";
  }
  return out + rest->first.to_string() + ": rest}";
}

}  // namespace

std::string write_placement(const Placement& p) {
  check_writable(p);
  std::string out;
  out += "ktune: " + std::to_string(p.version) + "\n";
  out += "model: {path: " + yaml_scalar(p.model_path);
  if (!p.arch.empty()) out += ", arch: " + yaml_scalar(p.arch);
  out += "}\n";
  const RuntimeOptions& r = p.runtime;
  out += std::string("runtime: {cuda_graph: ") + (r.cuda_graph ? "true" : "false") +
         ", moe_kernel: " + moe_kernel_name(r.moe_kernel) +
         ", cpu_handoff: " + cpu_handoff_name(r.cpu_handoff) +
         ", cpu_threads: " + std::to_string(r.cpu_threads) +
         ", context: " + std::to_string(r.context) + ", batch: " + std::to_string(r.batch) +
         // Only when set, so files without multi-GPU keep their standard form.
         (r.gpu_transport == GpuTransport::Auto
              ? std::string()
              : std::string(", gpu_transport: ") + gpu_transport_name(r.gpu_transport)) +
         (r.pcie_assist_permille == 0
              ? std::string()
              : ", pcie_assist: " + pcie_assist_text(r.pcie_assist_permille)) +
         "}\n";
  out += "layers:\n";
  size_t i = 0;
  while (i < p.layers.size()) {
    size_t j = i;
    while (j + 1 < p.layers.size() && p.layers[j + 1] == p.layers[i]) ++j;
    const std::string range =
        j > i ? std::to_string(i) + "-" + std::to_string(j) : std::to_string(i);
    out += "  - {layers: \"" + range + "\", attention: " + p.layers[i].attention.to_string() +
           ", experts: " + experts_map(p.layers[i]) + "}\n";
    i = j + 1;
  }
  if (p.predicted) {
    std::vector<std::string> parts;
    if (p.predicted->decode_tok_s) {
      parts.push_back("decode_tok_s: " + format_number(*p.predicted->decode_tok_s));
    }
    if (p.predicted->prefill_tok_s) {
      parts.push_back("prefill_tok_s: " + format_number(*p.predicted->prefill_tok_s));
    }
    if (!p.predicted->memory_gib.empty()) {
      std::string m = "memory_gib: {";
      bool first = true;
      for (const auto& [d, gib] : p.predicted->memory_gib) {
        m += (first ? "" : ", ") + d.to_string() + ": " + format_number(gib);
        first = false;
      }
      parts.push_back(m + "}");
    }
    std::string line = "predicted: {";
    for (size_t k = 0; k < parts.size(); ++k) line += (k ? ", " : "") + parts[k];
    out += line + "}\n";
  }
  if (p.searched_on) {
    std::vector<std::string> parts;
    if (!p.searched_on->profile.empty()) {
      parts.push_back("profile: " + yaml_scalar(p.searched_on->profile));
    }
    if (!p.searched_on->router_stats.empty()) {
      parts.push_back("router_stats: " + yaml_scalar(p.searched_on->router_stats));
    }
    std::string line = "searched_on: {";
    for (size_t k = 0; k < parts.size(); ++k) line += (k ? ", " : "") + parts[k];
    out += line + "}\n";
  }
  return out;
}

void save_placement(const std::string& path, const Placement& p) {
  write_file_atomic(path, write_placement(p));
}

// --------------------------------------------------------------------------------- helpers -----

std::map<Device, int64_t> expert_counts(const Placement& p, int64_t layer) {
  std::map<Device, int64_t> counts;
  if (layer < 0 || layer >= p.n_layers()) return counts;
  for (const Device& d : p.layers[size_t(layer)].experts) ++counts[d];
  return counts;
}

std::map<Device, int64_t> expert_counts(const Placement& p) {
  std::map<Device, int64_t> counts;
  for (const LayerPlacement& l : p.layers) {
    for (const Device& d : l.experts) ++counts[d];
  }
  return counts;
}

Placement make_uniform_placement(const ModelConfig& cfg, Device attention, Device experts) {
  Placement p;
  p.arch = cfg.arch;
  p.layers.assign(
      static_cast<size_t>(cfg.n_layers),
      LayerPlacement{attention, std::vector<Device>(static_cast<size_t>(cfg.n_experts), experts)});
  return p;
}

Placement make_layer_split(const ModelConfig& cfg, int64_t gpu_layers, Device gpu, bool from_end) {
  if (gpu_layers < 0 || gpu_layers > cfg.n_layers) {
    throw_usage("--experts-on-gpu", std::to_string(gpu_layers) + " layers is out of range",
                "the model has " + std::to_string(cfg.n_layers) + " layers; give 0 to " +
                    std::to_string(cfg.n_layers));
  }
  Placement p = make_uniform_placement(cfg, gpu, Device::cpu());
  for (int64_t i = 0; i < gpu_layers; ++i) {
    const int64_t l = from_end ? cfg.n_layers - 1 - i : i;
    std::fill(p.layers[size_t(l)].experts.begin(), p.layers[size_t(l)].experts.end(), gpu);
  }
  return p;
}

}  // namespace ktune
