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
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "inject/string_intern.h"

namespace ktune::exec_capture {

int32_t Capture::intern(const std::string& s) { return intern_string(strings, string_index, s); }

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
void put_str(std::string& o, const std::string& s) {
  o += '"';
  o += json_escape(s);
  o += '"';
}

// A table cell: integers as they are, times (Micros) as put_us writes them.
struct Micros {
  int64_t ns;
};
void put_cell(std::string& o, Micros t) { put_us(o, t.ns); }
template <typename T>
void put_cell(std::string& o, T v) {
  static_assert(std::is_integral_v<T>, "a cell is an integer or Micros");
  if constexpr (std::is_signed_v<T>) {
    o += std::to_string(static_cast<int64_t>(v));
  } else {
    o += std::to_string(static_cast<uint64_t>(v));
  }
}
// A row's cells, comma-separated.
template <typename First, typename... Rest>
void put_cells(std::string& o, const First& first, const Rest&... rest) {
  put_cell(o, first);
  ((o += ',', put_cell(o, rest)), ...);
}

// `,\n"name": {"columns": [...], "rows": [...]}` with one row per record that completed
// (end >= start > 0: a record still open at the flush has no end). put_row writes the cells.
template <typename Record, typename PutRow>
void put_table(std::string& o, const char* name, std::initializer_list<const char*> columns,
               const std::vector<Record>& records, PutRow put_row) {
  o += ",\n\"";
  o += name;
  o += "\": {\"columns\": [";
  const char* sep = "";
  for (const char* col : columns) {
    o += sep;
    o += '"';
    o += col;
    o += '"';
    sep = ", ";
  }
  o += "], \"rows\": [";
  bool first = true;
  for (const Record& x : records) {
    if (x.end < x.start || x.start <= 0) continue;  // incomplete at the flush
    o += first ? "\n[" : ",\n[";
    first = false;
    put_row(x);
    o += ']';
  }
  o += "]}";
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
  // A record's start (relative to the origin) and duration cells.
  auto since_origin = [&](int64_t t) { return Micros{t - origin}; };
  auto duration = [](int64_t start, int64_t end) { return Micros{end - start}; };

  std::string o;
  o.reserve(256 + 96 * (c.ops.size() + c.api.size() + c.ranges.size()));
  o += "{\"ktune_exec_capture\": 1,\n\"process\": {\"pid\": ";
  put_cell(o, c.pid);
  o += ", \"ppid\": ";
  put_cell(o, c.ppid);
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
  o += ", \"trace_level\": ";
  put_str(o, c.trace_level);
  o += ", \"trace_start_us\": ";
  put_us(o, c.trace_start > 0 ? c.trace_start - origin : 0);
  o += ", \"trace_end_us\": ";
  put_us(o, c.trace_end > 0 ? c.trace_end - origin : 0);
  o += ", \"open_ranges\": ";
  put_cell(o, c.open_ranges);
  o += "},\n\"timeline\": {\"clock\": \"cupti\", \"origin_ns\": ";
  put_cell(o, origin);
  o += ", \"time_unit\": \"us relative to origin_ns\", \"cupti\": ";
  o += c.cupti_ok ? "true" : "false";
  o += ", \"source_note\": ";
  put_str(o, c.cupti_ok ? "cupti (ktune profile --exec injection)"
                        : "no GPU trace: " + (c.cupti_error.empty() ? std::string("CUDA never "
                                                                                  "initialized")
                                                                    : c.cupti_error));
  o += ", \"dropped_records\": ";
  put_cell(o, c.dropped_records);
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
    put_cell(o, c.gpus[i].first);
    o += ", \"name\": ";
    put_str(o, c.gpus[i].second);
    o += "}";
  }
  o += "]";
  put_table(o, "ops",
            {"kind", "device", "stream", "start_us", "dur_us", "correlation", "graph_id",
             "graph_node_id", "name", "bytes"},
            c.ops, [&](const Op& x) {
              put_cells(o, x.kind, x.device, x.stream, since_origin(x.start),
                        duration(x.start, x.end), x.correlation, x.graph_id, x.graph_node_id,
                        x.name, x.bytes);
            });
  put_table(o, "api", {"name", "thread", "start_us", "dur_us", "correlation"}, c.api,
            [&](const Api& x) {
              put_cells(o, x.name, x.thread, since_origin(x.start), duration(x.start, x.end),
                        x.correlation);
            });
  put_table(o, "syncs", {"name", "stream", "start_us", "dur_us", "correlation"}, c.syncs,
            [&](const Sync& x) {
              put_cells(o, x.name, x.stream, since_origin(x.start), duration(x.start, x.end),
                        x.correlation);
            });
  put_table(o, "markers",
            {"name", "domain", "thread", "start_us", "dur_us", "payload", "has_payload"}, c.ranges,
            [&](const Range& x) {
              put_cells(o, x.name, x.domain, x.thread, since_origin(x.start),
                        duration(x.start, x.end), x.payload, x.has_payload ? 1 : 0);
            });
  o += "\n}}\n";
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
