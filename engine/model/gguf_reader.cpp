// GGUF v3 reader. Written from the format description (ggml docs/gguf.md); every count, length
// and offset in the file is checked against the bytes actually present before it is used, so a
// damaged or hostile file ends in a ktune::Error and never in a huge allocation or a read past
// the mapping.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <unordered_set>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "model/ggml_types.h"
#include "model/mapped_file.h"

static_assert(
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
    "the GGUF reader maps little-endian files directly; big-endian hosts need byte swaps");

namespace ktune::gguf {
namespace {

constexpr int kMaxArrayDepth = 8;  // real files nest at most 2 levels; deeper is a stack bomb
// Every Value costs ~100 bytes of memory, far more than its bytes in the file; the largest real
// metadata (tokenizer vocab, merges, scores) has well under a million entries.
constexpr uint64_t kMaxMetadataValues = uint64_t{1} << 24;
constexpr uint64_t kMaxKeyBytes = 65535;  // the spec's limit on key length
// Smallest possible encodings, used to reject absurd counts before anything is allocated.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;                  // key length, type, one-byte value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;  // name, n_dims, ne[0], type, offset
constexpr uint64_t kMaxDims = 4;

const char kDamagedFix[] =
    "the file is damaged or was not written by a GGUF v3 tool; download or "
    "create it again";
const char kTruncatedFix[] =
    "the file was probably not fully downloaded or written; download or "
    "create it again";

uint64_t min_encoded_bytes(ValueType t) {
  switch (t) {
    case ValueType::UINT8:
    case ValueType::INT8:
    case ValueType::BOOL:
      return 1;
    case ValueType::UINT16:
    case ValueType::INT16:
      return 2;
    case ValueType::UINT32:
    case ValueType::INT32:
    case ValueType::FLOAT32:
      return 4;
    case ValueType::UINT64:
    case ValueType::INT64:
    case ValueType::FLOAT64:
    case ValueType::STRING:  // the length alone
      return 8;
    case ValueType::ARRAY:  // element type + count
      return 12;
  }
  return 1;
}

bool is_valid_type(uint32_t raw) { return raw <= static_cast<uint32_t>(ValueType::FLOAT64); }

std::string shape_string(const std::vector<int64_t>& ne) {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(ne[i]);
  }
  return s + "]";
}

// Bounds-checked little-endian reader over the mapped bytes.
class Cursor {
 public:
  Cursor(const uint8_t* base, size_t size, const std::string& name)
      : base_(base), size_(size), name_(name) {}

  size_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }

  void need(uint64_t n, const std::string& what) const {
    if (n > left()) {
      throw Error(name_,
                  "the file is truncated: " + what + " at offset " + std::to_string(pos_) +
                      " needs " + std::to_string(n) + " bytes but only " + std::to_string(left()) +
                      " remain (file size " + std::to_string(size_) + ")",
                  kTruncatedFix);
    }
  }

  template <class T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const std::string& what) {
    const uint64_t len = read<uint64_t>("the length of " + what);
    if (len > left()) {
      throw Error(name_,
                  what + " at offset " + std::to_string(pos_ - 8) + " claims " +
                      std::to_string(len) + " bytes but only " + std::to_string(left()) +
                      " remain in the file",
                  kDamagedFix);
    }
    std::string s(reinterpret_cast<const char*>(base_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return s;
  }

 private:
  const uint8_t* base_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& name_;
};

class MetadataParser {
 public:
  MetadataParser(Cursor& c, const std::string& name) : c_(c), name_(name) {}

  Value read_value(ValueType t, int depth, const std::string& key) {
    if (++values_ > kMaxMetadataValues) {
      throw Error(name_,
                  "metadata key '" + key + "': the metadata holds more than " +
                      std::to_string(kMaxMetadataValues) + " values in total",
                  "this is not a model file ktune can read (real files hold far fewer); check "
                  "where it came from");
    }
    const std::string what = "the value of metadata key '" + key + "'";
    Value v;
    v.type = t;
    switch (t) {
      case ValueType::UINT8:
        v.u = c_.read<uint8_t>(what);
        break;
      case ValueType::INT8:
        v.i = c_.read<int8_t>(what);
        break;
      case ValueType::UINT16:
        v.u = c_.read<uint16_t>(what);
        break;
      case ValueType::INT16:
        v.i = c_.read<int16_t>(what);
        break;
      case ValueType::UINT32:
        v.u = c_.read<uint32_t>(what);
        break;
      case ValueType::INT32:
        v.i = c_.read<int32_t>(what);
        break;
      case ValueType::UINT64:
        v.u = c_.read<uint64_t>(what);
        break;
      case ValueType::INT64:
        v.i = c_.read<int64_t>(what);
        break;
      case ValueType::FLOAT32:
        v.f = c_.read<float>(what);
        break;
      case ValueType::FLOAT64:
        v.f = c_.read<double>(what);
        break;
      case ValueType::BOOL: {
        const uint8_t b = c_.read<uint8_t>(what);
        if (b > 1) {
          throw Error(name_,
                      "metadata key '" + key + "' holds a bool byte of " + std::to_string(b) +
                          " at offset " + std::to_string(c_.pos() - 1) + " (must be 0 or 1)",
                      kDamagedFix);
        }
        v.b = b != 0;
        break;
      }
      case ValueType::STRING:
        v.s = c_.read_string(what);
        break;
      case ValueType::ARRAY:
        read_array(v, depth, key);
        break;
    }
    return v;
  }

  ValueType read_type(const std::string& key, const char* role) {
    const size_t at = c_.pos();
    const uint32_t raw = c_.read<uint32_t>(std::string(role) + " of metadata key '" + key + "'");
    if (!is_valid_type(raw)) {
      throw Error(name_,
                  "metadata key '" + key + "' has unknown " + role + " " + std::to_string(raw) +
                      " at offset " + std::to_string(at) + " (GGUF defines 0..12)",
                  kDamagedFix);
    }
    return static_cast<ValueType>(raw);
  }

 private:
  void read_array(Value& v, int depth, const std::string& key) {
    const ValueType elem = read_type(key, "array element type");
    if (elem == ValueType::ARRAY && depth + 1 >= kMaxArrayDepth) {
      throw Error(name_,
                  "metadata key '" + key + "' nests arrays more than " +
                      std::to_string(kMaxArrayDepth) + " levels deep",
                  kDamagedFix);
    }
    const uint64_t count = c_.read<uint64_t>("the length of array '" + key + "'");
    // Each element takes at least min_encoded_bytes, so a count the remaining bytes cannot
    // hold is rejected before any memory is reserved.
    if (count > c_.left() / min_encoded_bytes(elem)) {
      throw Error(name_,
                  "metadata key '" + key + "' claims an array of " + std::to_string(count) + " " +
                      value_type_name(elem) + " values, which cannot fit in the " +
                      std::to_string(c_.left()) + " bytes left in the file",
                  kDamagedFix);
    }
    v.array_type = elem;
    v.array.reserve(static_cast<size_t>(std::min<uint64_t>(count, 1u << 20)));
    for (uint64_t k = 0; k < count; ++k) v.array.push_back(read_value(elem, depth + 1, key));
  }

  Cursor& c_;
  const std::string& name_;
  uint64_t values_ = 0;
};

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Value

const char* value_type_name(ValueType t) {
  switch (t) {
    case ValueType::UINT8:
      return "uint8";
    case ValueType::INT8:
      return "int8";
    case ValueType::UINT16:
      return "uint16";
    case ValueType::INT16:
      return "int16";
    case ValueType::UINT32:
      return "uint32";
    case ValueType::INT32:
      return "int32";
    case ValueType::FLOAT32:
      return "float32";
    case ValueType::BOOL:
      return "bool";
    case ValueType::STRING:
      return "string";
    case ValueType::ARRAY:
      return "array";
    case ValueType::UINT64:
      return "uint64";
    case ValueType::INT64:
      return "int64";
    case ValueType::FLOAT64:
      return "float64";
  }
  return "unknown";
}

namespace {
Value make_unsigned(ValueType t, uint64_t v) {
  Value x;
  x.type = t;
  x.u = v;
  return x;
}
Value make_signed(ValueType t, int64_t v) {
  Value x;
  x.type = t;
  x.i = v;
  return x;
}
Value make_float(ValueType t, double v) {
  Value x;
  x.type = t;
  x.f = v;
  return x;
}
}  // namespace

Value Value::u8(uint8_t v) { return make_unsigned(ValueType::UINT8, v); }
Value Value::i8(int8_t v) { return make_signed(ValueType::INT8, v); }
Value Value::u16(uint16_t v) { return make_unsigned(ValueType::UINT16, v); }
Value Value::i16(int16_t v) { return make_signed(ValueType::INT16, v); }
Value Value::u32(uint32_t v) { return make_unsigned(ValueType::UINT32, v); }
Value Value::i32(int32_t v) { return make_signed(ValueType::INT32, v); }
Value Value::u64(uint64_t v) { return make_unsigned(ValueType::UINT64, v); }
Value Value::i64(int64_t v) { return make_signed(ValueType::INT64, v); }
// Stored widened; the writer narrows FLOAT32 back, which is exact for any value that came in as
// a float.
Value Value::f32(float v) { return make_float(ValueType::FLOAT32, v); }
Value Value::f64(double v) { return make_float(ValueType::FLOAT64, v); }
Value Value::boolean(bool v) {
  Value x;
  x.type = ValueType::BOOL;
  x.b = v;
  return x;
}
Value Value::string(std::string v) {
  Value x;
  x.type = ValueType::STRING;
  x.s = std::move(v);
  return x;
}
Value Value::make_array(ValueType elem_type, std::vector<Value> elems) {
  for (size_t k = 0; k < elems.size(); ++k) {
    if (elems[k].type != elem_type) {
      throw Error("gguf metadata",
                  "array element " + std::to_string(k) + " has type " +
                      value_type_name(elems[k].type) + " but the array holds " +
                      value_type_name(elem_type),
                  "build a GGUF array from values of one type");
    }
  }
  Value x;
  x.type = ValueType::ARRAY;
  x.array_type = elem_type;
  x.array = std::move(elems);
  return x;
}

bool Value::is_integer() const {
  switch (type) {
    case ValueType::UINT8:
    case ValueType::INT8:
    case ValueType::UINT16:
    case ValueType::INT16:
    case ValueType::UINT32:
    case ValueType::INT32:
    case ValueType::UINT64:
    case ValueType::INT64:
      return true;
    default:
      return false;
  }
}

bool Value::is_float() const { return type == ValueType::FLOAT32 || type == ValueType::FLOAT64; }

bool Value::operator==(const Value& o) const {
  if (type != o.type) return false;
  switch (type) {
    case ValueType::UINT8:
    case ValueType::UINT16:
    case ValueType::UINT32:
    case ValueType::UINT64:
      return u == o.u;
    case ValueType::INT8:
    case ValueType::INT16:
    case ValueType::INT32:
    case ValueType::INT64:
      return i == o.i;
    case ValueType::FLOAT32:
    case ValueType::FLOAT64:
      // NaN == NaN here: a metadata value that round-trips unchanged should compare equal.
      return f == o.f || (std::isnan(f) && std::isnan(o.f));
    case ValueType::BOOL:
      return b == o.b;
    case ValueType::STRING:
      return s == o.s;
    case ValueType::ARRAY:
      return array_type == o.array_type && array == o.array;
  }
  return false;
}

int64_t TensorInfo::n_elements() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;  // validated not to overflow when parsed or declared
  return n;
}

// ---------------------------------------------------------------------------------------------
// File

File File::open(const std::string& path) {
  detail::MappedFile m = detail::map_file_readonly(path, "GGUF model");
  File f;
  f.path_ = path;
  f.part_paths_ = {path};
  f.mapping_ = std::move(m.keep);
  f.base_ = m.data;
  f.size_ = m.size;
  f.parse();
  return f;
}

namespace {

// llama.cpp's split file names: PREFIX-%05d-of-%05d.gguf with 1-based part numbers.
std::string split_part_name(const std::string& prefix, uint64_t part, uint64_t count) {
  char tail[64];
  std::snprintf(tail, sizeof tail, "-%05llu-of-%05llu.gguf", static_cast<unsigned long long>(part),
                static_cast<unsigned long long>(count));
  return prefix + tail;
}

const char kSplitFix[] =
    "keep all parts of a split model in one folder, named as llama.cpp's gguf-split names them "
    "(NAME-00001-of-0000N.gguf ...), and pass the first part";

}  // namespace

File File::open_split(const std::string& first_part) {
  File f = open(first_part);
  if (f.find("split.count") == nullptr) return f;
  const uint64_t count = f.get_uint("split.count");
  const uint64_t no = f.get_uint_or("split.no", 0);
  if (count <= 1) return f;
  if (count > 100000) {
    throw Error(first_part, "split.count is " + std::to_string(count), kDamagedFix);
  }
  // The other parts' names follow from the first one's: PREFIX-00001-of-0000N.gguf.
  const std::string first_tail = split_part_name("", 1, count);
  if (no != 0) {
    throw Error(first_part,
                "is part " + std::to_string(no + 1) + " of a model split into " +
                    std::to_string(count) + " files (split.no = " + std::to_string(no) + ")",
                "pass the first part (the file whose name ends in " + first_tail + ")");
  }
  if (first_part.size() <= first_tail.size() ||
      first_part.compare(first_part.size() - first_tail.size(), first_tail.size(), first_tail) !=
          0) {
    throw Error(first_part,
                "is the first part of a model split into " + std::to_string(count) +
                    " files, but its name does not end in " + first_tail +
                    ", so the other parts cannot be found",
                kSplitFix);
  }
  const std::string prefix = first_part.substr(0, first_part.size() - first_tail.size());
  std::unordered_set<std::string> names;
  for (const TensorInfo& t : f.tensors_) names.insert(t.name);
  for (uint64_t i = 1; i < count; ++i) {
    const std::string path = split_part_name(prefix, i + 1, count);
    std::FILE* probe = std::fopen(path.c_str(), "rb");
    if (probe == nullptr) {
      throw Error(path,
                  "part " + std::to_string(i + 1) + " of " + std::to_string(count) +
                      " of the split model " + first_part + " is missing or unreadable",
                  kSplitFix);
    }
    std::fclose(probe);
    File part = open(path);
    const Value* pc = part.find("split.count");
    const Value* pn = part.find("split.no");
    const uint64_t part_count = pc ? part.get_uint("split.count") : 0;
    const uint64_t part_no = pn ? part.get_uint("split.no") : 0;
    if (pc == nullptr || pn == nullptr || part_count != count || part_no != i) {
      throw Error(path,
                  "does not belong to the split model " + first_part + ": expected split.no " +
                      std::to_string(i) + " of split.count " + std::to_string(count) + ", found " +
                      (pn ? "split.no " + std::to_string(part_no) : std::string("no split.no")) +
                      (pc ? " of split.count " + std::to_string(part_count)
                          : std::string(" and no split.count")),
                  "the parts come from different downloads or models; download the parts "
                  "again from one source");
    }
    for (TensorInfo& t : part.tensors_) {
      if (!names.insert(t.name).second) {
        throw Error(path, "tensor '" + t.name + "' is also in an earlier part", kDamagedFix);
      }
      t.part = static_cast<uint32_t>(i);
      f.tensors_.push_back(std::move(t));
    }
    f.part_mappings_.push_back(part.mapping_);
    f.part_paths_.push_back(path);
  }
  if (f.find("split.tensors.count") != nullptr) {
    const uint64_t want = f.get_uint("split.tensors.count");
    if (want != f.tensors_.size()) {
      throw Error(first_part,
                  "split.tensors.count says the model has " + std::to_string(want) +
                      " tensors, its " + std::to_string(count) + " parts hold " +
                      std::to_string(f.tensors_.size()),
                  "a part is damaged or from another model; download the parts again");
    }
  }
  f.tensor_index_.clear();
  f.tensor_index_.reserve(f.tensors_.size());
  for (size_t k = 0; k < f.tensors_.size(); ++k) f.tensor_index_.emplace(f.tensors_[k].name, k);
  return f;
}

File File::from_memory(const uint8_t* data, size_t size, const std::string& name) {
  File f;
  f.path_ = name;
  f.part_paths_ = {name};
  f.base_ = data;
  f.size_ = size;
  if (size == 0) {
    throw Error(name, "the GGUF model file is empty (0 bytes)",
                "it was probably not fully downloaded or written; download or create it again");
  }
  f.parse();
  return f;
}

void File::parse() {
  Cursor c(base_, size_, path_);

  // --- header -------------------------------------------------------------------------------
  c.need(4, "the GGUF magic");
  const uint32_t magic = c.read<uint32_t>("the GGUF magic");
  if (magic != kMagic) {
    std::string shown;
    for (int k = 0; k < 4; ++k) {
      const unsigned char ch = base_[k];
      if (ch >= 0x20 && ch < 0x7f) {
        shown += static_cast<char>(ch);
      } else {
        static const char hex[] = "0123456789abcdef";
        shown += "\\x";
        shown += hex[ch >> 4];
        shown += hex[ch & 15];
      }
    }
    std::string hint = "pass a .gguf model file";
    if (size_ > 8 && base_[8] == '{') {
      hint = "this looks like a safetensors file; pass a .gguf file or use the safetensors input";
    }
    throw Error(path_, "not a GGUF file (it starts with '" + shown + "', expected 'GGUF')", hint);
  }
  version_ = c.read<uint32_t>("the GGUF version");
  if (version_ != kVersion) {
    if (version_ == 0x03000000u || version_ == 0x02000000u || version_ == 0x01000000u) {
      throw Error(path_, "this is a big-endian GGUF file, which ktune does not read",
                  "use the little-endian version of the model");
    }
    if (version_ == 1 || version_ == 2) {
      throw Error(
          path_,
          "GGUF version " + std::to_string(version_) + " is not supported (ktune reads version 3)",
          "convert the model again with a current llama.cpp (convert_hf_to_gguf.py) to "
          "get a version 3 file");
    }
    throw Error(path_,
                "unknown GGUF version " + std::to_string(version_) + " (ktune reads version 3)",
                "the file is damaged or from a newer GGUF tool; re-create it with a tool that "
                "writes GGUF v3");
  }
  const uint64_t n_tensors = c.read<uint64_t>("the tensor count");
  const uint64_t n_kv = c.read<uint64_t>("the metadata key count");
  // Reject impossible counts before they size any container: every entry needs a minimum
  // number of bytes, and the file has only so many left.
  if (n_tensors > c.left() / kMinTensorInfoBytes) {
    throw Error(path_,
                "the header claims " + std::to_string(n_tensors) + " tensors, but the " +
                    std::to_string(c.left()) + " bytes after the header cannot hold that many",
                kDamagedFix);
  }
  if (n_kv > c.left() / kMinKvBytes) {
    throw Error(path_,
                "the header claims " + std::to_string(n_kv) + " metadata keys, but the " +
                    std::to_string(c.left()) + " bytes after the header cannot hold that many",
                kDamagedFix);
  }
  if (n_tensors * kMinTensorInfoBytes + n_kv * kMinKvBytes > c.left()) {
    throw Error(path_,
                "the header claims " + std::to_string(n_tensors) + " tensors and " +
                    std::to_string(n_kv) + " metadata keys, more than the " +
                    std::to_string(c.left()) + " bytes after the header can hold",
                kDamagedFix);
  }

  // --- metadata -----------------------------------------------------------------------------
  MetadataParser mp(c, path_);
  std::unordered_set<std::string> keys;
  kv_.clear();
  kv_.reserve(static_cast<size_t>(n_kv));
  for (uint64_t k = 0; k < n_kv; ++k) {
    const size_t at = c.pos();
    std::string key = c.read_string("metadata key " + std::to_string(k));
    if (key.empty() || key.size() > kMaxKeyBytes) {
      throw Error(path_,
                  "metadata key " + std::to_string(k) + " at offset " + std::to_string(at) +
                      (key.empty() ? " is empty" : " is longer than 65535 bytes"),
                  kDamagedFix);
    }
    if (!keys.insert(key).second) {
      throw Error(path_, "metadata key '" + key + "' appears twice", kDamagedFix);
    }
    const ValueType t = mp.read_type(key, "value type");
    Value v = mp.read_value(t, 0, key);
    kv_.emplace_back(std::move(key), std::move(v));
  }

  alignment_ = kDefaultAlignment;
  if (const Value* a = find("general.alignment")) {
    bool ok = a->is_integer();
    uint64_t val = 0;
    if (ok) {
      const bool is_signed = a->type == ValueType::INT8 || a->type == ValueType::INT16 ||
                             a->type == ValueType::INT32 || a->type == ValueType::INT64;
      if (is_signed) {
        ok = a->i > 0;
        val = ok ? static_cast<uint64_t>(a->i) : 0;
      } else {
        val = a->u;
      }
    }
    // Bounded by 2^31 so that aligning any in-file offset cannot overflow 64 bits.
    if (!ok || val == 0 || (val & (val - 1)) != 0 || val > (uint64_t{1} << 31)) {
      std::string shown = a->is_integer()
                              ? (a->type == ValueType::INT8 || a->type == ValueType::INT16 ||
                                         a->type == ValueType::INT32 || a->type == ValueType::INT64
                                     ? std::to_string(a->i)
                                     : std::to_string(a->u))
                              : std::string("a ") + value_type_name(a->type);
      throw Error(
          path_,
          "general.alignment is " + shown + "; it must be a non-zero power of two (at most 2^31)",
          kDamagedFix);
    }
    alignment_ = val;
  }

  // --- tensor infos -------------------------------------------------------------------------
  std::unordered_set<std::string> names;
  tensors_.clear();
  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t k = 0; k < n_tensors; ++k) {
    TensorInfo t;
    t.name = c.read_string("the name of tensor " + std::to_string(k));
    const std::string label = "tensor '" + t.name + "'";
    if (!names.insert(t.name).second) {
      throw Error(path_, "two tensors are named '" + t.name + "'", kDamagedFix);
    }
    const uint32_t n_dims = c.read<uint32_t>("the dimension count of " + label);
    if (n_dims == 0 || n_dims > kMaxDims) {
      throw Error(path_,
                  label + " has " + std::to_string(n_dims) + " dimensions (GGUF allows 1 to 4)",
                  kDamagedFix);
    }
    t.ne.resize(n_dims);
    for (uint32_t d = 0; d < n_dims; ++d) {
      t.ne[d] = c.read<int64_t>("the shape of " + label);
      if (t.ne[d] < 0) {
        throw Error(path_,
                    label + " has a negative size " + std::to_string(t.ne[d]) + " in dimension " +
                        std::to_string(d),
                    kDamagedFix);
      }
    }
    const size_t type_at = c.pos();
    t.type = c.read<uint32_t>("the type of " + label);
    t.offset = c.read<uint64_t>("the data offset of " + label);

    const ggml::TypeTraits* tr = ggml::type_traits(t.type);
    if (tr == nullptr) {
      if (const char* old = ggml::removed_type_name(t.type)) {
        throw Error(path_,
                    label + " uses ggml type " + std::to_string(t.type) + " (" + old +
                        "), which ggml has removed from GGUF files",
                    "convert or quantize the model again with a current llama.cpp");
      }
      throw Error(path_,
                  label + " has unknown ggml type id " + std::to_string(t.type) + " at offset " +
                      std::to_string(type_at) + " (ktune knows ids 0.." +
                      std::to_string(ggml::type_id_limit() - 1) + ")",
                  "the file is damaged or written by a newer ggml than ktune knows; check the "
                  "download or re-quantize with a type ktune supports (q4_0, q8_0, f16, bf16)");
    }
    uint64_t elems = 1;
    for (int64_t d : t.ne) {
      if (mul_overflows(elems, static_cast<uint64_t>(d), &elems) ||
          elems > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw Error(path_,
                    "the element count of " + label + " (shape " + shape_string(t.ne) +
                        ") overflows 64 bits",
                    kDamagedFix);
      }
    }
    if (t.ne[0] % tr->block_elems != 0) {
      throw Error(path_,
                  label + " of type " + tr->name + " has rows of " + std::to_string(t.ne[0]) +
                      " elements, not a multiple of the type's block of " +
                      std::to_string(tr->block_elems),
                  kDamagedFix);
    }
    uint64_t nbytes = 0;
    if (mul_overflows(elems / static_cast<uint64_t>(tr->block_elems),
                      static_cast<uint64_t>(tr->block_bytes), &nbytes)) {
      throw Error(path_, "the byte size of " + label + " overflows 64 bits", kDamagedFix);
    }
    t.nbytes = nbytes;
    if (t.offset % alignment_ != 0) {
      throw Error(path_,
                  label + " has data offset " + std::to_string(t.offset) +
                      ", not a multiple of the alignment " + std::to_string(alignment_),
                  kDamagedFix);
    }
    tensors_.push_back(std::move(t));
  }

  // --- data section -------------------------------------------------------------------------
  const uint64_t end_of_infos = c.pos();
  data_offset_ = (end_of_infos + alignment_ - 1) / alignment_ * alignment_;
  const uint64_t data_size = data_offset_ <= size_ ? size_ - data_offset_ : 0;
  for (TensorInfo& t : tensors_) {
    if (t.nbytes == 0) {
      t.data = (data_offset_ <= size_ && t.offset <= data_size) ? base_ + data_offset_ + t.offset
                                                                : nullptr;
      continue;
    }
    if (data_offset_ > size_ || t.offset > data_size || t.nbytes > data_size - t.offset) {
      // Compute the end without overflowing for the message.
      const std::string end = t.offset > std::numeric_limits<uint64_t>::max() - t.nbytes
                                  ? std::string("beyond 2^64")
                                  : std::to_string(data_offset_ + t.offset + t.nbytes);
      throw Error(path_,
                  "the data of tensor '" + t.name + "' (" + std::to_string(t.nbytes) +
                      " bytes at data offset " + std::to_string(t.offset) +
                      ") ends at file offset " + end + ", past the end of the file (" +
                      std::to_string(size_) + " bytes)",
                  kTruncatedFix);
    }
    t.data = base_ + data_offset_ + t.offset;
  }
  // Overlapping tensors mean a damaged index; layout order itself is free.
  std::vector<const TensorInfo*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const TensorInfo& t : tensors_) {
    if (t.nbytes > 0) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < by_offset.size(); ++k) {
    const TensorInfo* a = by_offset[k - 1];
    const TensorInfo* b = by_offset[k];
    if (a->offset + a->nbytes > b->offset) {
      throw Error(path_, "the data of tensors '" + a->name + "' and '" + b->name + "' overlap",
                  kDamagedFix);
    }
  }

  tensor_index_.clear();
  tensor_index_.reserve(tensors_.size());
  for (size_t k = 0; k < tensors_.size(); ++k) tensor_index_.emplace(tensors_[k].name, k);
}

const Value* File::find(std::string_view key) const {
  for (const auto& kv : kv_) {
    if (kv.first == key) return &kv.second;
  }
  return nullptr;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

[[noreturn]] void throw_missing(const std::string& path, std::string_view key) {
  throw Error(path, "metadata key '" + std::string(key) + "' is missing",
              "the file does not describe a complete model; re-create it with ktune gen-model "
              "or a current llama.cpp converter");
}

[[noreturn]] void throw_mistyped(const std::string& path, std::string_view key, const Value& v,
                                 const char* expected) {
  throw Error(path,
              "metadata key '" + std::string(key) + "' has type " + value_type_name(v.type) +
                  ", expected " + expected,
              "the file was written by a tool ktune does not know or is damaged; re-create it "
              "with ktune gen-model or a current llama.cpp converter");
}

bool is_signed_int(ValueType t) {
  return t == ValueType::INT8 || t == ValueType::INT16 || t == ValueType::INT32 ||
         t == ValueType::INT64;
}

uint64_t as_uint(const std::string& path, std::string_view key, const Value& v) {
  if (!v.is_integer()) throw_mistyped(path, key, v, "a non-negative integer");
  if (is_signed_int(v.type)) {
    if (v.i < 0) {
      throw Error(path,
                  "metadata key '" + std::string(key) + "' is " + std::to_string(v.i) +
                      ", expected a non-negative integer",
                  "the file is damaged or was written by a faulty converter; re-create it");
    }
    return static_cast<uint64_t>(v.i);
  }
  return v.u;
}

double as_float(const std::string& path, std::string_view key, const Value& v) {
  if (v.is_float()) return v.f;
  if (!v.is_integer()) throw_mistyped(path, key, v, "a number");
  return is_signed_int(v.type) ? static_cast<double>(v.i) : static_cast<double>(v.u);
}

}  // namespace

uint64_t File::get_uint(std::string_view key) const {
  const Value* v = find(key);
  if (!v) throw_missing(path_, key);
  return as_uint(path_, key, *v);
}

double File::get_float(std::string_view key) const {
  const Value* v = find(key);
  if (!v) throw_missing(path_, key);
  return as_float(path_, key, *v);
}

std::string File::get_string(std::string_view key) const {
  const Value* v = find(key);
  if (!v) throw_missing(path_, key);
  if (v->type != ValueType::STRING) throw_mistyped(path_, key, *v, "a string");
  return v->s;
}

bool File::get_bool(std::string_view key) const {
  const Value* v = find(key);
  if (!v) throw_missing(path_, key);
  if (v->type != ValueType::BOOL) throw_mistyped(path_, key, *v, "a bool");
  return v->b;
}

uint64_t File::get_uint_or(std::string_view key, uint64_t fallback) const {
  const Value* v = find(key);
  return v ? as_uint(path_, key, *v) : fallback;
}

double File::get_float_or(std::string_view key, double fallback) const {
  const Value* v = find(key);
  return v ? as_float(path_, key, *v) : fallback;
}

}  // namespace ktune::gguf
