// safetensors reader. The JSON header is untrusted: its size is bounded before parsing, the
// parser's nesting depth is bounded, and every tensor's dtype, shape and byte range is checked
// against the data actually present before a pointer is handed out.
#include "ktune/engine/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "ktune/engine/error.h"
#include "ktune/engine/quant.h"
#include "model/mapped_file.h"

namespace ktune::safetensors {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the format's own limit
constexpr int kMaxJsonDepth = 16;                  // real headers nest 3 levels
const char kDamagedFix[] =
    "the file is damaged or not a safetensors checkpoint; download or "
    "export it again";

struct DtypeInfo {
  const char* name;
  uint64_t bytes;
};
constexpr DtypeInfo kDtypes[] = {
    {"F64", 8},  {"F32", 4},     {"F16", 2},     {"BF16", 2},    {"I64", 8}, {"I32", 4},
    {"I16", 2},  {"I8", 1},      {"U64", 8},     {"U32", 4},     {"U16", 2}, {"U8", 1},
    {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"F8_E8M0", 1},
};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const DtypeInfo& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// Raised from the parser callback; turned into a ktune::Error once parsing has unwound.
struct HeaderProblem {
  std::string problem;
};

}  // namespace

int64_t Tensor::n_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated not to overflow when parsed
  return n;
}

File File::open(const std::string& path) {
  detail::MappedFile m = detail::map_file_readonly(path, "safetensors");
  File f;
  f.path_ = path;
  f.mapping_ = std::move(m.keep);
  f.base_ = m.data;
  f.size_ = m.size;
  f.parse();
  return f;
}

File File::from_memory(const uint8_t* data, size_t size, const std::string& name) {
  File f;
  f.path_ = name;
  f.base_ = data;
  f.size_ = size;
  f.parse();
  return f;
}

void File::parse() {
  if (size_ < 8) {
    throw Error(path_,
                "the file is truncated: it has " + std::to_string(size_) +
                    " bytes, fewer than the 8-byte header length",
                "it was probably not fully downloaded or written; download or export it again");
  }
  uint64_t header_len = 0;
  std::memcpy(&header_len, base_, 8);
  if (header_len > kMaxHeaderBytes) {
    throw Error(path_,
                "the header length is " + std::to_string(header_len) +
                    " bytes, above the format's limit of 100 MB",
                kDamagedFix);
  }
  if (header_len > size_ - 8) {
    throw Error(path_,
                "the file is truncated: the header needs " + std::to_string(header_len) +
                    " bytes but only " + std::to_string(size_ - 8) + " follow the length",
                "it was probably not fully downloaded or written; download or export it again");
  }
  const char* json_begin = reinterpret_cast<const char*>(base_ + 8);
  const char* json_end = json_begin + header_len;
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size_ - data_start;

  // The callback bounds nesting (a "[[[[..." header must not exhaust memory or stack) and
  // catches duplicate tensor names, which the JSON library would otherwise merge silently.
  std::unordered_set<std::string> seen;
  auto callback = [&](int depth, nlohmann::ordered_json::parse_event_t event,
                      nlohmann::ordered_json& parsed) {
    using E = nlohmann::ordered_json::parse_event_t;
    if ((event == E::object_start || event == E::array_start) && depth >= kMaxJsonDepth) {
      throw HeaderProblem{"the JSON header nests deeper than " + std::to_string(kMaxJsonDepth) +
                          " levels"};
    }
    if (event == E::key && depth == 1 && parsed.is_string()) {
      if (!seen.insert(parsed.get<std::string>()).second) {
        throw HeaderProblem{"the header names tensor '" + parsed.get<std::string>() + "' twice"};
      }
    }
    return true;
  };
  nlohmann::ordered_json header;
  try {
    header = nlohmann::ordered_json::parse(json_begin, json_end, callback);
  } catch (const HeaderProblem& p) {
    throw Error(path_, p.problem, kDamagedFix);
  } catch (const nlohmann::json::exception& e) {
    throw Error(path_, std::string("the JSON header is not valid JSON (") + e.what() + ")",
                kDamagedFix);
  }
  if (!header.is_object()) {
    throw Error(path_, "the JSON header is not an object", kDamagedFix);
  }

  tensors_.clear();
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        throw Error(path_, "__metadata__ is not a JSON object", kDamagedFix);
      }
      continue;
    }
    const std::string label = "tensor '" + name + "'";
    if (!entry.is_object()) {
      throw Error(path_, label + " is not described by a JSON object", kDamagedFix);
    }
    auto dt = entry.find("dtype");
    auto sh = entry.find("shape");
    auto of = entry.find("data_offsets");
    if (dt == entry.end() || sh == entry.end() || of == entry.end()) {
      throw Error(path_, label + " lacks one of dtype, shape, data_offsets", kDamagedFix);
    }
    if (!dt->is_string()) throw Error(path_, label + ": dtype is not a string", kDamagedFix);
    Tensor t;
    t.name = name;
    t.dtype = dt->get<std::string>();
    const DtypeInfo* info = find_dtype(t.dtype);
    if (info == nullptr) {
      throw Error(path_, label + " has unknown dtype '" + t.dtype + "'",
                  "ktune reads F64, F32, F16, BF16, F8 and integer dtypes; convert the "
                  "checkpoint to one of them");
    }
    if (!sh->is_array()) throw Error(path_, label + ": shape is not an array", kDamagedFix);
    uint64_t elems = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned() ||
          d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw Error(path_,
                    label + ": shape " + sh->dump() +
                        " holds a value that is not a "
                        "non-negative integer",
                    kDamagedFix);
      }
      const uint64_t v = d.get<uint64_t>();
      if (__builtin_mul_overflow(elems, v, &elems) ||
          elems > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw Error(path_,
                    label + ": the element count of shape " + sh->dump() + " overflows 64 bits",
                    kDamagedFix);
      }
      t.shape.push_back(static_cast<int64_t>(v));
    }
    if (!of->is_array() || of->size() != 2 || !(*of)[0].is_number_unsigned() ||
        !(*of)[1].is_number_unsigned()) {
      throw Error(path_, label + ": data_offsets is not a pair of non-negative integers",
                  kDamagedFix);
    }
    const uint64_t begin = (*of)[0].get<uint64_t>();
    const uint64_t end = (*of)[1].get<uint64_t>();
    if (begin > end) {
      throw Error(path_,
                  label + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                      "] end before they begin",
                  kDamagedFix);
    }
    if (end > data_size) {
      throw Error(path_,
                  label + ": data_offsets end at " + std::to_string(end) + " but the data has " +
                      std::to_string(data_size) + " bytes",
                  "the file is truncated or damaged; download or export it again");
    }
    uint64_t want = 0;
    const bool overflow = __builtin_mul_overflow(elems, info->bytes, &want);
    if (overflow || want != end - begin) {
      throw Error(path_,
                  label + ": shape " + shape_string(t.shape) + " of " + t.dtype + " needs " +
                      (overflow ? std::string("more than 2^64") : std::to_string(want)) +
                      " bytes but data_offsets span " + std::to_string(end - begin),
                  kDamagedFix);
    }
    t.nbytes = end - begin;
    t.data = base_ + data_start + begin;
    tensors_.push_back(std::move(t));
  }

  // Overlapping byte ranges mean a damaged header; the order of tensors in the data is free.
  std::vector<const Tensor*> by_offset;
  for (const Tensor& t : tensors_) {
    if (t.nbytes > 0) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const Tensor* a, const Tensor* b) { return a->data < b->data; });
  for (size_t k = 1; k < by_offset.size(); ++k) {
    const Tensor* a = by_offset[k - 1];
    const Tensor* b = by_offset[k];
    if (a->data + a->nbytes > b->data) {
      throw Error(path_, "the data of tensors '" + a->name + "' and '" + b->name + "' overlap",
                  kDamagedFix);
    }
  }

  index_.clear();
  index_.reserve(tensors_.size());
  for (size_t k = 0; k < tensors_.size(); ++k) index_.emplace(tensors_[k].name, k);
}

const Tensor* File::find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::vector<float> File::read_f32(std::string_view name,
                                  const std::vector<int64_t>& expected_shape) const {
  const Tensor* t = find(name);
  if (t == nullptr) {
    throw Error(path_, "tensor '" + std::string(name) + "' is missing",
                "check that the checkpoint matches the model architecture");
  }
  if (!expected_shape.empty() && expected_shape != t->shape) {
    throw Error(path_,
                "tensor '" + t->name + "' has shape " + shape_string(t->shape) + ", expected " +
                    shape_string(expected_shape),
                "check that the checkpoint matches the model configuration");
  }
  const size_t n = static_cast<size_t>(t->n_elements());
  std::vector<float> out(n);
  if (t->dtype == "F32") {
    if (n) std::memcpy(out.data(), t->data, n * sizeof(float));
  } else if (t->dtype == "F16" || t->dtype == "BF16") {
    const bool half = t->dtype == "F16";
    for (size_t k = 0; k < n; ++k) {
      uint16_t h;
      std::memcpy(&h, t->data + 2 * k, 2);  // the data need not be 2-byte aligned
      out[k] = half ? fp16_to_fp32(h) : bf16_to_fp32(h);
    }
  } else {
    throw Error(
        path_,
        "tensor '" + t->name + "' has dtype " + t->dtype + ", ktune reads F32, F16 or BF16 here",
        "convert the checkpoint to float (F32, F16 or BF16)");
  }
  return out;
}

}  // namespace ktune::safetensors
