// Names stored once and referred to by index (the capture's and the timeline's "strings"):
// shared by the capture (inject/exec_capture.h), the injection's NVTX names and the profiler's
// CUPTI parser. Header-only plain C++, so the injection library links nothing more.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace ktune::exec_capture {

// The index of s in strings; the first time, s is appended and its index recorded in index.
inline int32_t intern_string(std::vector<std::string>& strings,
                             std::unordered_map<std::string, int32_t>& index,
                             const std::string& s) {
  auto it = index.find(s);
  if (it != index.end()) return it->second;
  strings.push_back(s);
  const auto i = static_cast<int32_t>(strings.size() - 1);
  index.emplace(s, i);
  return i;
}

}  // namespace ktune::exec_capture
