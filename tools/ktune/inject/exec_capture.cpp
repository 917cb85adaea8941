// The capture file writer (inject/exec_capture.h). Hand-written JSON: the injection library
// stays free of other libraries' headers and allocations stay predictable at exit.
#include "inject/exec_capture.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <limits>

namespace ktune::exec_capture {

int32_t Capture::intern(const std::string& s) {
  auto it = string_index.find(s);
  if (it != string_index.end()) return it->second;
  strings.push_back(s);
  const auto i = static_cast<int32_t>(strings.size() - 1);
  string_index.emplace(s, i);
  return i;
}

std::string json_escape(const std::string& s) {
  std::string o;
  o.reserve(s.size() + 2);
  for (unsigned char ch : s) {
    switch (ch) {
      case '"':
        o += "\\\"";
        break;
      case '\\':
        o += "\\\\";
        break;
      case '\n':
        o += "\\n";
        break;
      case '\t':
        o += "\\t";
        break;
      case '\r':
        o += "\\r";
        break;
      default:
        if (ch < 0x20) {
          char b[8];
          std::snprintf(b, sizeof b, "\\u%04x", ch);
          o += b;
        } else {
          o += static_cast<char>(ch);
        }
    }
  }
  return o;
}

namespace {

// Microseconds with exactly three decimals from a nanosecond count (no rounding error).
void put_us(std::string& o, int64_t ns) {
  char b[40];
  const char* sign = ns < 0 ? "-" : "";
  const uint64_t a = ns < 0 ? static_cast<uint64_t>(-(ns + 1)) + 1 : static_cast<uint64_t>(ns);
  std::snprintf(b, sizeof b, "%s%" PRIu64 ".%03" PRIu64, sign, a / 1000, a % 1000);
  o += b;
}
void put_i(std::string& o, int64_t v) { o += std::to_string(v); }
void put_u(std::string& o, uint64_t v) { o += std::to_string(v); }
void put_str(std::string& o, const std::string& s) {
  o += '"';
  o += json_escape(s);
  o += '"';
}

}  // namespace

std::string to_json(const Capture& c) {
  int64_t origin = std::numeric_limits<int64_t>::max();
  auto low = [&](int64_t t) {
    if (t > 0) origin = std::min(origin, t);
  };
  for (const Op& x : c.ops) low(x.start);
  for (const Api& x : c.api) low(x.start);
  for (const Sync& x : c.syncs) low(x.start);
  for (const Range& x : c.ranges) low(x.start);
  low(c.trace_start);
  if (origin == std::numeric_limits<int64_t>::max()) origin = 0;

  std::string o;
  o.reserve(256 + 96 * (c.ops.size() + c.api.size() + c.ranges.size()));
  o += "{\"ktune_exec_capture\": 1,\n\"process\": {\"pid\": ";
  put_i(o, c.pid);
  o += ", \"ppid\": ";
  put_i(o, c.ppid);
  o += ", \"command\": ";
  put_str(o, c.command);
  o += ", \"flush_reason\": ";
  put_str(o, c.flush_reason);
  o += ", \"cuda_initialized\": ";
  o += c.cuda_initialized ? "true" : "false";
  o += ", \"cupti_ok\": ";
  o += c.cupti_ok ? "true" : "false";
  o += ", \"cupti_error\": ";
  put_str(o, c.cupti_error);
  o += ", \"notes\": ";
  put_str(o, c.notes);
  o += ", \"trace_start_us\": ";
  put_us(o, c.trace_start > 0 ? c.trace_start - origin : 0);
  o += ", \"trace_end_us\": ";
  put_us(o, c.trace_end > 0 ? c.trace_end - origin : 0);
  o += ", \"open_ranges\": ";
  put_i(o, c.open_ranges);
  o += "},\n\"timeline\": {\"clock\": \"cupti\", \"origin_ns\": ";
  put_i(o, origin);
  o += ", \"time_unit\": \"us relative to origin_ns\", \"cupti\": ";
  o += c.cupti_ok ? "true" : "false";
  o += ", \"source_note\": ";
  put_str(o, c.cupti_ok ? "cupti (ktune profile --exec injection)"
                        : "no GPU trace: " + (c.cupti_error.empty() ? std::string("CUDA never "
                                                                                  "initialized")
                                                                    : c.cupti_error));
  o += ", \"dropped_records\": ";
  put_u(o, c.dropped_records);
  o += ", \"dropped_spans\": 0, \"cupti_overhead_us\": ";
  put_us(o, c.cupti_overhead_ns);
  o += ",\n\"strings\": [";
  for (size_t i = 0; i < c.strings.size(); ++i) {
    if (i) o += ", ";
    put_str(o, c.strings[i]);
  }
  o += "],\n\"gpus\": [";
  for (size_t i = 0; i < c.gpus.size(); ++i) {
    if (i) o += ", ";
    o += "{\"index\": ";
    put_i(o, c.gpus[i].first);
    o += ", \"name\": ";
    put_str(o, c.gpus[i].second);
    o += "}";
  }
  o += "],\n\"ops\": {\"columns\": [\"kind\", \"device\", \"stream\", \"start_us\", \"dur_us\", "
       "\"correlation\", \"graph_id\", \"graph_node_id\", \"name\", \"bytes\"], \"rows\": [";
  bool first = true;
  for (const Op& x : c.ops) {
    if (x.end < x.start || x.start <= 0) continue;  // incomplete at the flush
    o += first ? "\n[" : ",\n[";
    first = false;
    put_i(o, x.kind);
    o += ',';
    put_i(o, x.device);
    o += ',';
    put_u(o, x.stream);
    o += ',';
    put_us(o, x.start - origin);
    o += ',';
    put_us(o, x.end - x.start);
    o += ',';
    put_u(o, x.correlation);
    o += ',';
    put_u(o, x.graph_id);
    o += ',';
    put_u(o, x.graph_node_id);
    o += ',';
    put_i(o, x.name);
    o += ',';
    put_i(o, x.bytes);
    o += ']';
  }
  o += "]},\n\"api\": {\"columns\": [\"name\", \"thread\", \"start_us\", \"dur_us\", "
       "\"correlation\"], \"rows\": [";
  first = true;
  for (const Api& x : c.api) {
    if (x.end < x.start || x.start <= 0) continue;
    o += first ? "\n[" : ",\n[";
    first = false;
    put_i(o, x.name);
    o += ',';
    put_u(o, x.thread);
    o += ',';
    put_us(o, x.start - origin);
    o += ',';
    put_us(o, x.end - x.start);
    o += ',';
    put_u(o, x.correlation);
    o += ']';
  }
  o += "]},\n\"syncs\": {\"columns\": [\"name\", \"stream\", \"start_us\", \"dur_us\", "
       "\"correlation\"], \"rows\": [";
  first = true;
  for (const Sync& x : c.syncs) {
    if (x.end < x.start || x.start <= 0) continue;
    o += first ? "\n[" : ",\n[";
    first = false;
    put_i(o, x.name);
    o += ',';
    put_u(o, x.stream);
    o += ',';
    put_us(o, x.start - origin);
    o += ',';
    put_us(o, x.end - x.start);
    o += ',';
    put_u(o, x.correlation);
    o += ']';
  }
  o += "]},\n\"markers\": {\"columns\": [\"name\", \"domain\", \"thread\", \"start_us\", "
       "\"dur_us\", \"payload\", \"has_payload\"], \"rows\": [";
  first = true;
  for (const Range& x : c.ranges) {
    if (x.end < x.start || x.start <= 0) continue;
    o += first ? "\n[" : ",\n[";
    first = false;
    put_i(o, x.name);
    o += ',';
    put_i(o, x.domain);
    o += ',';
    put_u(o, x.thread);
    o += ',';
    put_us(o, x.start - origin);
    o += ',';
    put_us(o, x.end - x.start);
    o += ',';
    put_i(o, x.payload);
    o += ',';
    o += x.has_payload ? '1' : '0';
    o += ']';
  }
  o += "]}\n}}\n";
  return o;
}

std::string file_name(const std::string& dir, int64_t pid) {
  std::string d = dir.empty() ? std::string(".") : dir;
  if (d.back() != '/') d += '/';
  return d + "ktune-exec-" + std::to_string(pid) + ".json";
}

bool is_capture_file_name(const std::string& b) {
  const std::string pre = "ktune-exec-", post = ".json";
  if (b.size() <= pre.size() + post.size()) return false;
  if (b.compare(0, pre.size(), pre) != 0) return false;
  if (b.compare(b.size() - post.size(), post.size(), post) != 0) return false;
  for (size_t i = pre.size(); i < b.size() - post.size(); ++i) {
    if (b[i] < '0' || b[i] > '9') return false;
  }
  return true;
}

std::string write_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return "cannot create " + tmp + ": " + std::strerror(errno);
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string e = std::strerror(errno);
      ::close(fd);
      ::unlink(tmp.c_str());
      return "cannot write " + tmp + ": " + e;
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return "cannot close " + tmp;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string e = std::strerror(errno);
    ::unlink(tmp.c_str());
    return "cannot rename " + tmp + " to " + path + ": " + e;
  }
  return "";
}

}  // namespace ktune::exec_capture
