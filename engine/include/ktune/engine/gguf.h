// GGUF v3 reader (mmap) and streaming writer. Format: ggml's docs/gguf.md. All multi-byte values
// are little-endian; strings are u64 length + bytes; tensor data starts at the first multiple of
// general.alignment (default 32) after the tensor infos, and each tensor's offset is relative to
// that start and itself a multiple of the alignment.
//
// The reader validates everything before handing out a pointer: counts against the file size,
// string lengths, nesting, tensor types, shapes (overflow), offsets and alignment, data bounds.
// Any violation throws ktune::Error naming the file and what is wrong.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ktune/engine/quant.h"

namespace ktune::gguf {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as little-endian u32
constexpr uint32_t kVersion = 3;
constexpr uint64_t kDefaultAlignment = 32;

enum class ValueType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6,
  BOOL = 7, STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* value_type_name(ValueType t);

// One metadata value. Integers keep their exact value in `i` (signed types) or `u` (unsigned
// types); floats in `f`; arrays hold elements of one type `array_type`.
struct Value {
  ValueType type = ValueType::UINT32;
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0.0;
  bool b = false;
  std::string s;
  ValueType array_type = ValueType::UINT8;
  std::vector<Value> array;

  static Value u8(uint8_t v);
  static Value i8(int8_t v);
  static Value u16(uint16_t v);
  static Value i16(int16_t v);
  static Value u32(uint32_t v);
  static Value i32(int32_t v);
  static Value u64(uint64_t v);
  static Value i64(int64_t v);
  static Value f32(float v);
  static Value f64(double v);
  static Value boolean(bool v);
  static Value string(std::string v);
  static Value make_array(ValueType elem_type, std::vector<Value> elems);

  bool is_integer() const;
  bool is_float() const;
  bool operator==(const Value& o) const;
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] is the contiguous (row) dimension
  uint32_t type = 0;        // ggml type id (QuantType value when supported)
  uint64_t offset = 0;      // relative to the start of the data section
  uint64_t nbytes = 0;      // computed from type and shape
  const uint8_t* data = nullptr;  // into the mapping (reader only)
  uint32_t part = 0;        // which file of a split model holds it (0: the first; reader only)

  int64_t n_elements() const;
  QuantType quant() const { return static_cast<QuantType>(type); }
};

class File {
 public:
  // mmaps `path` read-only and parses it. Throws ktune::Error on any problem.
  static File open(const std::string& path);
  // A model file that may be split (llama.cpp's gguf-split: NAME-00001-of-0000N.gguf ...; the
  // first part carries the metadata, every part split.no (0-based), split.count and
  // split.tensors.count). Given the first part, maps every part and merges their tensors, so
  // tensors() and find_tensor() see the whole model; a file without split.count is opened as
  // open() does. Throws ktune::Error naming the file at fault: another part than the first, a
  // missing part, a part whose split keys do not match, a tensor in two parts, or a tensor count
  // that differs from split.tensors.count.
  static File open_split(const std::string& first_part);
  // Parses a buffer the caller keeps alive (fuzzing, tests). `name` is used in error messages.
  static File from_memory(const uint8_t* data, size_t size, const std::string& name);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // absolute file offset of the data
  uint64_t file_size() const { return size_; }

  const std::vector<std::pair<std::string, Value>>& metadata() const { return kv_; }
  const Value* find(std::string_view key) const;
  // Typed getters: throw ktune::Error "<file>: metadata key K ..." when missing or mistyped.
  uint64_t get_uint(std::string_view key) const;  // any non-negative integer type
  double get_float(std::string_view key) const;   // float or integer types
  std::string get_string(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  uint64_t get_uint_or(std::string_view key, uint64_t fallback) const;
  double get_float_or(std::string_view key, double fallback) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const;
  // The files of a split model in order (just path() for one file).
  const std::vector<std::string>& part_paths() const { return part_paths_; }

 private:
  void parse();
  std::string path_;
  std::shared_ptr<void> mapping_;  // keeps the mmap alive (null for from_memory)
  std::vector<std::shared_ptr<void>> part_mappings_;  // the other parts of a split model
  std::vector<std::string> part_paths_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = kDefaultAlignment;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, Value>> kv_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;  // name -> index, for find_tensor
};

// Sink handed to the writer's tensor callback; the callback must write exactly nbytes.
class ByteSink {
 public:
  virtual ~ByteSink() = default;
  virtual void write(const void* data, size_t n) = 0;
};

// Streaming writer: metadata and tensor infos are declared first, then write() emits the header
// and asks the callback for each tensor's bytes in declaration order, so a 17 GB model never has
// to sit in memory. Output is atomic (temp file + fsync + rename).
class Writer {
 public:
  void set(std::string key, Value v);  // replaces an existing key, else appends (order kept)
  void set_alignment(uint64_t alignment);  // also written as general.alignment when not 32
  // Declares a tensor; nbytes follows from type and shape. Throws on a shape that does not fit
  // the type's block size or a duplicate name.
  void add_tensor(std::string name, std::vector<int64_t> ne, QuantType type);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  uint64_t total_bytes() const;  // size of the file write() will produce

  using TensorFiller = std::function<void(size_t index, const TensorInfo& info, ByteSink& out)>;
  using Progress = std::function<void(uint64_t bytes_done, uint64_t bytes_total)>;
  void write(const std::string& path, const TensorFiller& fill, const Progress& progress = {}) const;

  // Serializes everything before the tensor data (header, metadata, tensor infos, padding).
  std::string header_bytes() const;

 private:
  void assign_offsets();        // lays tensors out back to back, each aligned
  uint64_t data_bytes() const;  // size of the data section including the final padding
  std::vector<std::pair<std::string, Value>> kv_;
  std::vector<TensorInfo> tensors_;
  uint64_t alignment_ = kDefaultAlignment;
};

}  // namespace ktune::gguf
