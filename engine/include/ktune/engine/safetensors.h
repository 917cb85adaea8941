// safetensors reader (Hugging Face checkpoints): u64 little-endian header length N, N bytes of
// JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__":
// {...}}, then the data. Offsets are relative to the end of the header. mmap, validated like the
// GGUF reader: every problem is a ktune::Error naming the file.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace ktune::safetensors {

struct Tensor {
  std::string name;
  std::string dtype;          // "F32", "F16", "BF16", "F64", "I64", ... as written
  std::vector<int64_t> shape; // row-major (PyTorch order: last dimension contiguous)
  const uint8_t* data = nullptr;
  uint64_t nbytes = 0;

  int64_t n_elements() const;
};

class File {
 public:
  static File open(const std::string& path);
  static File from_memory(const uint8_t* data, size_t size, const std::string& name);

  const std::string& path() const { return path_; }
  const std::vector<Tensor>& tensors() const { return tensors_; }
  const Tensor* find(std::string_view name) const;

  // Reads tensor `name` as float32 (F32, F16 or BF16 source), row-major. Throws when missing or
  // of another dtype or when `expected_shape` (if non-empty) differs.
  std::vector<float> read_f32(std::string_view name,
                              const std::vector<int64_t>& expected_shape = {}) const;

 private:
  void parse();
  std::string path_;
  std::shared_ptr<void> mapping_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  std::vector<Tensor> tensors_;
  std::unordered_map<std::string, size_t> index_;  // name -> index, for find
};

}  // namespace ktune::safetensors
