// Streaming GGUF v3 writer. The layout it produces (and the reader expects):
//   magic u32, version u32, tensor count u64, kv count u64,
//   kv*: key string, value type u32, value
//   tensor info*: name string, n_dims u32, ne u64 x n_dims, ggml type u32, data offset u64
//   zero padding to the alignment, then each tensor's data followed by zero padding to the
//   alignment (the last one too, as ggml does, so files concatenate cleanly).
#include <algorithm>
#include <cstring>
#include <limits>

#include "ktune/engine/atomic_file.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/interrupt.h"
#include "model/ggml_types.h"

namespace ktune::gguf {
namespace {

constexpr int kMaxArrayDepth = 8;  // same bound the reader enforces
constexpr uint64_t kProgressStep = uint64_t{64} << 20;
const char kWhere[] = "gguf writer";

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

template <class T>
void put(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // little-endian host (asserted in the reader)
  out.append(b, sizeof(T));
}

void put_string(std::string& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out += s;
}

bool is_valid_type(ValueType t) {
  return static_cast<uint32_t>(t) <= static_cast<uint32_t>(ValueType::FLOAT64);
}

// Checks a value before it is accepted, so write() cannot fail halfway on bad metadata.
void validate(const Value& v, int depth, const std::string& key) {
  if (!is_valid_type(v.type)) {
    throw Error(kWhere,
                "metadata key '" + key + "' has an invalid value type " +
                    std::to_string(static_cast<uint32_t>(v.type)),
                "build values with the gguf::Value factory functions");
  }
  if (v.type != ValueType::ARRAY) return;
  if (!is_valid_type(v.array_type)) {
    throw Error(kWhere, "metadata key '" + key + "' has an invalid array element type",
                "build values with the gguf::Value factory functions");
  }
  if (v.array_type == ValueType::ARRAY && depth + 1 >= kMaxArrayDepth) {
    throw Error(kWhere,
                "metadata key '" + key + "' nests arrays more than " +
                    std::to_string(kMaxArrayDepth) + " levels deep",
                "flatten the value; readers reject deeper nesting");
  }
  for (size_t k = 0; k < v.array.size(); ++k) {
    const Value& e = v.array[k];
    if (e.type != v.array_type) {
      throw Error(kWhere,
                  "metadata key '" + key + "': array element " + std::to_string(k) + " has type " +
                      value_type_name(e.type) + " but the array holds " +
                      value_type_name(v.array_type),
                  "build a GGUF array from values of one type");
    }
    validate(e, depth + 1, key);
  }
}

void put_value(std::string& out, const Value& v) {
  switch (v.type) {
    case ValueType::UINT8:
      put<uint8_t>(out, static_cast<uint8_t>(v.u));
      break;
    case ValueType::INT8:
      put<int8_t>(out, static_cast<int8_t>(v.i));
      break;
    case ValueType::UINT16:
      put<uint16_t>(out, static_cast<uint16_t>(v.u));
      break;
    case ValueType::INT16:
      put<int16_t>(out, static_cast<int16_t>(v.i));
      break;
    case ValueType::UINT32:
      put<uint32_t>(out, static_cast<uint32_t>(v.u));
      break;
    case ValueType::INT32:
      put<int32_t>(out, static_cast<int32_t>(v.i));
      break;
    case ValueType::UINT64:
      put<uint64_t>(out, v.u);
      break;
    case ValueType::INT64:
      put<int64_t>(out, v.i);
      break;
    case ValueType::FLOAT32:
      put<float>(out, static_cast<float>(v.f));
      break;
    case ValueType::FLOAT64:
      put<double>(out, v.f);
      break;
    case ValueType::BOOL:
      put<uint8_t>(out, v.b ? 1 : 0);
      break;
    case ValueType::STRING:
      put_string(out, v.s);
      break;
    case ValueType::ARRAY:
      put<uint32_t>(out, static_cast<uint32_t>(v.array_type));
      put<uint64_t>(out, v.array.size());
      for (const Value& e : v.array) put_value(out, e);
      break;
  }
}

uint64_t checked_alignment(uint64_t a) {
  if (a == 0 || (a & (a - 1)) != 0 || a > (uint64_t{1} << 31)) {
    throw Error(kWhere,
                "alignment " + std::to_string(a) + " is not a non-zero power of two up to 2^31",
                "use 32 (the GGUF default) or another power of two such as 64");
  }
  return a;
}

// Ctrl-C / SIGTERM: stop between chunks; the AtomicFile's destructor removes the temp file.
void check_interrupt(const AtomicFile& f) {
  if (interrupted()) {
    throw_if_interrupted(f.path() + " was not written (its temporary file was removed)");
  }
}

// Forwards the callback's bytes to the file, refusing to go past the tensor's size, and reports
// progress at least every 64 MiB even when the callback hands over one huge buffer.
class TensorSink : public ByteSink {
 public:
  TensorSink(AtomicFile& f, const TensorInfo& info, uint64_t* done, uint64_t total,
             uint64_t* last_reported, const Writer::Progress& progress)
      : f_(f), info_(info), done_(done), total_(total), last_(last_reported), progress_(progress) {}

  void write(const void* data, size_t n) override {
    if (n > info_.nbytes - written_) {
      throw Error(f_.path(),
                  "the data callback for tensor '" + info_.name + "' wrote more than its " +
                      std::to_string(info_.nbytes) + " bytes",
                  "this is a bug in the code that fills the tensor; report it");
    }
    const uint8_t* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
      // Cut chunks at the next report point so reports come every 64 MiB, not every 64 MiB
      // plus whatever was pending.
      uint64_t room = kProgressStep - std::min(kProgressStep, *done_ - *last_);
      if (room == 0) room = kProgressStep;
      const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, room));
      check_interrupt(f_);
      f_.write(p, chunk);
      p += chunk;
      n -= chunk;
      written_ += chunk;
      *done_ += chunk;
      if (progress_ && *done_ - *last_ >= kProgressStep) {
        progress_(*done_, total_);
        *last_ = *done_;
      }
    }
  }

  uint64_t written() const { return written_; }

 private:
  AtomicFile& f_;
  const TensorInfo& info_;
  uint64_t written_ = 0;
  uint64_t* done_;
  uint64_t total_;
  uint64_t* last_;
  const Writer::Progress& progress_;
};

void write_zeros(AtomicFile& f, uint64_t n) {
  static const char zeros[4096] = {};
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, sizeof(zeros)));
    check_interrupt(f);
    f.write(zeros, chunk);
    n -= chunk;
  }
}

}  // namespace

void Writer::set(std::string key, Value v) {
  if (key.empty() || key.size() > 65535) {
    throw Error(kWhere, "metadata key '" + key + "' must be 1 to 65535 bytes long",
                "choose a shorter, non-empty key");
  }
  validate(v, 0, key);
  if (key == "general.alignment") {
    // Keep the layout and the written key in agreement whichever way the caller sets it.
    if (v.type != ValueType::UINT32) {
      throw Error(kWhere, "general.alignment must be a uint32 value", "use Writer::set_alignment");
    }
    alignment_ = checked_alignment(v.u);
  }
  for (auto& kv : kv_) {
    if (kv.first == key) {
      kv.second = std::move(v);
      assign_offsets();
      return;
    }
  }
  kv_.emplace_back(std::move(key), std::move(v));
  assign_offsets();
}

void Writer::set_alignment(uint64_t alignment) {
  alignment_ = checked_alignment(alignment);
  if (alignment_ != kDefaultAlignment) {
    set("general.alignment", Value::u32(static_cast<uint32_t>(alignment_)));
  } else {
    kv_.erase(std::remove_if(kv_.begin(), kv_.end(),
                             [](const auto& kv) { return kv.first == "general.alignment"; }),
              kv_.end());
  }
  assign_offsets();
}

void Writer::assign_offsets() {
  uint64_t off = 0;
  for (TensorInfo& t : tensors_) {
    t.offset = off;
    off = align_up(off + t.nbytes, alignment_);
  }
}

void Writer::add_tensor(std::string name, std::vector<int64_t> ne, QuantType type) {
  const uint32_t id = static_cast<uint32_t>(type);
  const ggml::TypeTraits* tr = ggml::type_traits(id);
  const std::string label = "tensor '" + name + "'";
  if (tr == nullptr) {
    throw Error(kWhere,
                label + " has ggml type id " + std::to_string(id) +
                    ", which ggml does "
                    "not define",
                "use one of the QuantType values");
  }
  if (name.empty()) {
    throw Error(kWhere, "a tensor has an empty name", "give every tensor a unique name");
  }
  for (const TensorInfo& t : tensors_) {
    if (t.name == name) {
      throw Error(kWhere, "two tensors are named '" + name + "'",
                  "give every tensor a unique name");
    }
  }
  if (ne.empty() || ne.size() > 4) {
    throw Error(kWhere, label + " has " + std::to_string(ne.size()) + " dimensions",
                "GGUF tensors have 1 to 4 dimensions");
  }
  uint64_t elems = 1;
  for (int64_t d : ne) {
    if (d < 0) {
      throw Error(kWhere, label + " has a negative dimension " + std::to_string(d),
                  "pass sizes >= 0");
    }
    if (__builtin_mul_overflow(elems, static_cast<uint64_t>(d), &elems) ||
        elems > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      throw Error(kWhere, "the element count of " + label + " overflows 64 bits",
                  "check the shape");
    }
  }
  if (ne[0] % tr->block_elems != 0) {
    throw Error(kWhere,
                label + " has rows of " + std::to_string(ne[0]) + " elements, not a multiple " +
                    "of the " + tr->name + " block of " + std::to_string(tr->block_elems),
                "choose a row size that is a multiple of the block or another type");
  }
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(elems / static_cast<uint64_t>(tr->block_elems),
                             static_cast<uint64_t>(tr->block_bytes), &nbytes)) {
    throw Error(kWhere, "the byte size of " + label + " overflows 64 bits", "check the shape");
  }
  TensorInfo t;
  t.name = std::move(name);
  t.ne = std::move(ne);
  t.type = id;
  t.nbytes = nbytes;
  tensors_.push_back(std::move(t));
  assign_offsets();
}

std::string Writer::header_bytes() const {
  std::string out;
  put<uint32_t>(out, kMagic);
  put<uint32_t>(out, kVersion);
  put<uint64_t>(out, tensors_.size());
  put<uint64_t>(out, kv_.size());
  for (const auto& kv : kv_) {
    put_string(out, kv.first);
    put<uint32_t>(out, static_cast<uint32_t>(kv.second.type));
    put_value(out, kv.second);
  }
  for (const TensorInfo& t : tensors_) {
    put_string(out, t.name);
    put<uint32_t>(out, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) put<uint64_t>(out, static_cast<uint64_t>(d));
    put<uint32_t>(out, t.type);
    put<uint64_t>(out, t.offset);
  }
  out.resize(align_up(out.size(), alignment_), '\0');
  return out;
}

uint64_t Writer::data_bytes() const {
  if (tensors_.empty()) return 0;
  const TensorInfo& last = tensors_.back();
  return align_up(last.offset + last.nbytes, alignment_);
}

uint64_t Writer::total_bytes() const { return header_bytes().size() + data_bytes(); }

void Writer::write(const std::string& path, const TensorFiller& fill,
                   const Progress& progress) const {
  if (!fill && !tensors_.empty()) {
    throw Error(path, "no tensor data callback was given", "pass a TensorFiller to write()");
  }
  const std::string header = header_bytes();
  const uint64_t total = header.size() + data_bytes();
  AtomicFile f(path);
  f.write(header);
  uint64_t done = header.size();
  uint64_t last_reported = 0;
  uint64_t data_pos = 0;  // relative to the start of the data section
  for (size_t k = 0; k < tensors_.size(); ++k) {
    const TensorInfo& t = tensors_[k];
    write_zeros(f, t.offset - data_pos);
    done += t.offset - data_pos;
    TensorSink sink(f, t, &done, total, &last_reported, progress);
    fill(k, t, sink);
    if (sink.written() != t.nbytes) {
      throw Error(path,
                  "the data callback for tensor '" + t.name + "' wrote " +
                      std::to_string(sink.written()) + " bytes, expected " +
                      std::to_string(t.nbytes),
                  "this is a bug in the code that fills the tensor; report it");
    }
    data_pos = t.offset + t.nbytes;
  }
  write_zeros(f, data_bytes() - data_pos);
  f.commit();
  if (progress) progress(total, total);
}

}  // namespace ktune::gguf
