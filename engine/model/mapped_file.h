// Read-only memory mapping shared by the GGUF and safetensors readers, so both report a missing
// file, a folder, an unreadable or an empty file the same way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace ktune::detail {

struct MappedFile {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::shared_ptr<void> keep;  // unmaps when the last owner goes
};

// Maps `path` read-only (MAP_PRIVATE). `kind` names the expected content in messages ("GGUF
// model", "safetensors checkpoint"). Throws ktune::Error naming the path on any failure,
// including an empty file (a zero-byte download is the most common broken model file).
MappedFile map_file_readonly(const std::string& path, const char* kind);

}  // namespace ktune::detail
