// GGUF reader/writer: round trips, a byte-exact hand-built file, and hostile inputs that must
// end in ktune::Error (never a crash, a huge allocation or another exception type).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/quant.h"

namespace {

namespace fs = std::filesystem;
using ktune::QuantType;
using ktune::gguf::File;
using ktune::gguf::TensorInfo;
using ktune::gguf::Value;
using ktune::gguf::ValueType;
using ktune::gguf::Writer;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "ktune_gguf_XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    if (p == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (fs::path(path_) / name).string(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Little-endian byte builder for hand-made files.
struct Bytes {
  std::string s;
  Bytes& u8(uint8_t v) { return raw(&v, 1); }
  Bytes& u32(uint32_t v) { return raw(&v, 4); }
  Bytes& u64(uint64_t v) { return raw(&v, 8); }
  Bytes& i64(int64_t v) { return raw(&v, 8); }
  Bytes& f32(float v) { return raw(&v, 4); }
  Bytes& str(const std::string& v) {
    u64(v.size());
    s += v;
    return *this;
  }
  Bytes& raw(const void* p, size_t n) {
    s.append(static_cast<const char*>(p), n);
    return *this;
  }
  Bytes& pad_to(size_t a) {
    while (s.size() % a) s += '\0';
    return *this;
  }
};

// Byte pattern that differs per tensor and per position.
uint8_t pattern(size_t tensor, uint64_t k) {
  return static_cast<uint8_t>((k * 131 + tensor * 17 + (k >> 8)) & 0xff);
}

void fill_pattern(size_t index, const TensorInfo& info, ktune::gguf::ByteSink& out) {
  std::vector<uint8_t> buf(static_cast<size_t>(info.nbytes));
  for (uint64_t k = 0; k < info.nbytes; ++k) buf[k] = pattern(index, k);
  // Two writes, so the sink's accounting across calls is exercised too.
  const size_t half = buf.size() / 2;
  out.write(buf.data(), half);
  out.write(buf.data() + half, buf.size() - half);
}

// Parses bytes from an exactly sized heap buffer, so ASan catches any read past the end.
File parse_exact(const std::string& bytes, std::vector<uint8_t>& keep,
                 const std::string& name = "bad.gguf") {
  keep.assign(bytes.begin(), bytes.end());
  return File::from_memory(keep.data(), keep.size(), name);
}

void expect_error_impl(const std::string& bytes, const std::string& needle, int line) {
  std::vector<uint8_t> keep;
  try {
    parse_exact(bytes, keep);
    ADD_FAILURE() << "line " << line << ": no error, expected one containing '" << needle << "'";
  } catch (const ktune::Error& e) {
    EXPECT_EQ(e.where(), "bad.gguf") << "line " << line;
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "line " << line << ": message was: " << e.what();
    EXPECT_FALSE(e.fix().empty()) << "line " << line;
  }
}

void expect_error(const std::string& bytes, const std::string& needle) {
  expect_error_impl(bytes, needle, 0);
}

// A hand-built file: header with (possibly lying) counts, raw kv bytes, tensor infos, padding to
// 32, then `data_bytes` bytes of data.
struct RawTensor {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type = 0;
  uint64_t offset = 0;
  int n_dims = -1;  // -1: ne.size()
};

std::string raw_gguf(uint64_t n_tensors, uint64_t n_kv, const std::string& kv_bytes,
                     const std::vector<RawTensor>& tensors, size_t data_bytes,
                     uint32_t version = 3) {
  Bytes b;
  b.raw("GGUF", 4).u32(version).u64(n_tensors).u64(n_kv);
  b.s += kv_bytes;
  for (const RawTensor& t : tensors) {
    b.str(t.name).u32(t.n_dims < 0 ? static_cast<uint32_t>(t.ne.size())
                                   : static_cast<uint32_t>(t.n_dims));
    for (uint64_t d : t.ne) b.u64(d);
    b.u32(t.type).u64(t.offset);
  }
  b.pad_to(32);
  b.s.append(data_bytes, '\x5a');
  return b.s;
}

std::string one_tensor(const RawTensor& t, size_t data_bytes) {
  return raw_gguf(1, 0, "", {t}, data_bytes);
}

// Every metadata type, including arrays of strings, nested arrays, bools, negative ints, f64.
std::vector<std::pair<std::string, Value>> all_metadata() {
  std::vector<std::pair<std::string, Value>> kv;
  kv.emplace_back("general.architecture", Value::string("qwen3moe"));
  kv.emplace_back("t.u8", Value::u8(250));
  kv.emplace_back("t.i8", Value::i8(-128));
  kv.emplace_back("t.u16", Value::u16(65535));
  kv.emplace_back("t.i16", Value::i16(-32768));
  kv.emplace_back("t.u32", Value::u32(4000000000u));
  kv.emplace_back("t.i32", Value::i32(-2000000000));
  kv.emplace_back("t.u64", Value::u64(std::numeric_limits<uint64_t>::max()));
  kv.emplace_back("t.i64", Value::i64(std::numeric_limits<int64_t>::min()));
  kv.emplace_back("t.f32", Value::f32(-1.5e-3f));
  kv.emplace_back("t.f64", Value::f64(3.141592653589793238));
  kv.emplace_back("t.true", Value::boolean(true));
  kv.emplace_back("t.false", Value::boolean(false));
  kv.emplace_back("t.empty_string", Value::string(""));
  kv.emplace_back("t.utf8", Value::string("Grüße, 世界 \n\t\"quoted\""));
  kv.emplace_back("t.strings",
                  Value::make_array(ValueType::STRING, {Value::string("a"), Value::string(""),
                                                        Value::string("<|im_start|>")}));
  kv.emplace_back("t.i32s", Value::make_array(ValueType::INT32,
                                              {Value::i32(-1), Value::i32(0), Value::i32(7)}));
  kv.emplace_back("t.f32s",
                  Value::make_array(ValueType::FLOAT32, {Value::f32(0.25f), Value::f32(-8.0f)}));
  kv.emplace_back(
      "t.bools", Value::make_array(ValueType::BOOL, {Value::boolean(true), Value::boolean(false)}));
  kv.emplace_back("t.empty_array", Value::make_array(ValueType::UINT64, {}));
  Value inner1 = Value::make_array(ValueType::UINT8, {Value::u8(1), Value::u8(2)});
  Value inner2 = Value::make_array(ValueType::UINT8, {});
  Value strs = Value::make_array(ValueType::STRING, {Value::string("x")});
  Value mid = Value::make_array(ValueType::ARRAY, {strs});
  kv.emplace_back("t.nested", Value::make_array(ValueType::ARRAY, {inner1, inner2}));
  kv.emplace_back("t.nested3", Value::make_array(ValueType::ARRAY, {mid, mid}));
  kv.emplace_back("t.f64s", Value::make_array(ValueType::FLOAT64, {Value::f64(-1e300)}));
  kv.emplace_back("t.i64s", Value::make_array(ValueType::INT64, {Value::i64(-5)}));
  return kv;
}

std::vector<QuantType> supported_types() {
  return {QuantType::F32, QuantType::F16, QuantType::Q4_0, QuantType::Q8_0, QuantType::BF16};
}

// A valid small file used by the truncation and mutation tests. Its last tensor ends exactly at
// the end of the file, so every strict prefix is missing data.
std::string small_valid_file(const TempDir& dir) {
  Writer w;
  for (auto& kv : all_metadata()) w.set(kv.first, kv.second);
  w.add_tensor("blk.0.ffn_down.weight", {32, 2}, QuantType::Q8_0);
  w.add_tensor("token_embd.weight", {8, 2}, QuantType::F16);
  w.add_tensor("output_norm.weight", {8}, QuantType::F32);
  const std::string path = dir.file("small.gguf");
  w.write(path, fill_pattern);
  return read_all(path);
}

// ---------------------------------------------------------------------------------------------

TEST(GgufValue, FactoriesAndEquality) {
  EXPECT_EQ(Value::u8(3).u, 3u);
  EXPECT_EQ(Value::i16(-3).i, -3);
  EXPECT_TRUE(Value::i64(1).is_integer());
  EXPECT_TRUE(Value::f32(1).is_float());
  EXPECT_FALSE(Value::string("1").is_integer());
  EXPECT_EQ(Value::u32(5), Value::u32(5));
  EXPECT_FALSE(Value::u32(5) == Value::u64(5));  // type is part of the value
  EXPECT_FALSE(Value::string("a") == Value::string("b"));
  EXPECT_THROW(Value::make_array(ValueType::INT32, {Value::i32(1), Value::u32(2)}), ktune::Error);
  EXPECT_STREQ(ktune::gguf::value_type_name(ValueType::FLOAT64), "float64");
}

TEST(GgufRoundTrip, EveryMetadataType) {
  TempDir dir;
  Writer w;
  const auto kv = all_metadata();
  for (const auto& e : kv) w.set(e.first, e.second);
  w.set("t.u8", Value::u8(251));  // replacing keeps the position
  auto expected = kv;
  expected[1].second = Value::u8(251);
  const std::string path = dir.file("meta.gguf");
  w.write(path, {});
  File f = File::open(path);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.tensors().size(), 0u);
  ASSERT_EQ(f.metadata().size(), expected.size());
  for (size_t k = 0; k < expected.size(); ++k) {
    EXPECT_EQ(f.metadata()[k].first, expected[k].first);
    EXPECT_TRUE(f.metadata()[k].second == expected[k].second) << expected[k].first;
  }
  EXPECT_EQ(f.file_size(), w.total_bytes());
  EXPECT_EQ(f.file_size() % 32, 0u);

  // Typed getters.
  EXPECT_EQ(f.get_string("general.architecture"), "qwen3moe");
  EXPECT_EQ(f.get_uint("t.u8"), 251u);
  EXPECT_EQ(f.get_uint("t.u64"), std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(f.get_float("t.f64"), 3.141592653589793238);
  EXPECT_EQ(f.get_float("t.f32"), static_cast<double>(-1.5e-3f));
  EXPECT_EQ(f.get_float("t.i32"), -2000000000.0);
  EXPECT_TRUE(f.get_bool("t.true"));
  EXPECT_FALSE(f.get_bool("t.false"));
  EXPECT_EQ(f.get_uint_or("missing.key", 42), 42u);
  EXPECT_EQ(f.get_float_or("missing.key", 0.5), 0.5);
  EXPECT_EQ(f.get_uint_or("t.u16", 1), 65535u);
  const Value* nested = f.find("t.nested3");
  ASSERT_NE(nested, nullptr);
  EXPECT_EQ(nested->array[1].array[0].array[0].s, "x");

  auto expect_key_error = [&](auto fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const ktune::Error& e) {
      EXPECT_EQ(e.where(), path);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_key_error([&] { f.get_uint("no.such.key"); }, "'no.such.key' is missing");
  expect_key_error([&] { f.get_uint("t.i32"); }, "'t.i32' is -2000000000");
  expect_key_error([&] { f.get_uint("t.f32"); }, "'t.f32' has type float32");
  expect_key_error([&] { f.get_string("t.u8"); }, "'t.u8' has type uint8, expected a string");
  expect_key_error([&] { f.get_bool("t.u8"); }, "expected a bool");
  expect_key_error([&] { f.get_float("t.strings"); }, "'t.strings' has type array");
  expect_key_error([&] { f.get_uint_or("t.utf8", 3); }, "'t.utf8' has type string");
}

class GgufTensorRoundTrip : public ::testing::TestWithParam<uint64_t> {};

TEST_P(GgufTensorRoundTrip, EverySupportedType) {
  const uint64_t alignment = GetParam();
  TempDir dir;
  Writer w;
  w.set("general.name", Value::string("tensors"));
  w.set_alignment(alignment);
  std::vector<std::pair<std::string, QuantType>> declared;
  for (QuantType t : supported_types()) {
    const std::string name = std::string("w.") + std::to_string(static_cast<uint32_t>(t));
    w.add_tensor(name, {64, 3, 2}, t);
    declared.emplace_back(name, t);
  }
  // A 256-element block type, written and read back by id.
  w.add_tensor("w.q4_k", {256, 2}, static_cast<QuantType>(12));
  w.add_tensor("w.scalar", {1}, QuantType::F32);
  w.add_tensor("w.empty", {0, 4}, QuantType::F32);
  const std::string path = dir.file("tensors.gguf");
  std::vector<std::pair<uint64_t, uint64_t>> progress;
  w.write(path, fill_pattern,
          [&](uint64_t done, uint64_t total) { progress.emplace_back(done, total); });
  ASSERT_FALSE(progress.empty());
  EXPECT_EQ(progress.back().first, w.total_bytes());
  EXPECT_EQ(progress.back().second, w.total_bytes());

  File f = File::open(path);
  EXPECT_EQ(f.alignment(), alignment);
  EXPECT_EQ(f.data_offset() % alignment, 0u);
  EXPECT_EQ(f.file_size(), w.total_bytes());
  if (alignment != 32) {
    EXPECT_EQ(f.get_uint("general.alignment"), alignment);
  } else {
    EXPECT_EQ(f.find("general.alignment"), nullptr);
  }
  ASSERT_EQ(f.tensors().size(), w.tensors().size());
  const uint8_t* base = f.tensors()[0].data - f.data_offset() - f.tensors()[0].offset;
  for (size_t k = 0; k < f.tensors().size(); ++k) {
    const TensorInfo& got = f.tensors()[k];
    const TensorInfo& want = w.tensors()[k];
    EXPECT_EQ(got.name, want.name);
    EXPECT_EQ(got.ne, want.ne);
    EXPECT_EQ(got.type, want.type);
    EXPECT_EQ(got.offset, want.offset);
    EXPECT_EQ(got.nbytes, want.nbytes);
    EXPECT_EQ(got.offset % alignment, 0u) << got.name;
    EXPECT_EQ(f.find_tensor(got.name), &got);
    if (got.nbytes == 0) continue;
    ASSERT_NE(got.data, nullptr);
    EXPECT_EQ(static_cast<uint64_t>(got.data - base) % alignment, 0u);
    for (uint64_t i = 0; i < got.nbytes; ++i) {
      ASSERT_EQ(got.data[i], pattern(k, i)) << got.name << " byte " << i;
    }
  }
  for (const auto& d : declared) {
    const TensorInfo* t = f.find_tensor(d.first);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->quant(), d.second);
    EXPECT_EQ(static_cast<int64_t>(t->nbytes), 3 * 2 * ktune::row_bytes(d.second, 64));
    EXPECT_EQ(t->n_elements(), 64 * 3 * 2);
  }
  const TensorInfo* q4k = f.find_tensor("w.q4_k");
  ASSERT_NE(q4k, nullptr);
  EXPECT_EQ(q4k->type, 12u);
  EXPECT_EQ(q4k->nbytes, 2u * 144u);
  EXPECT_TRUE(ktune::is_supported_quant(q4k->type));
  EXPECT_EQ(f.find_tensor("no.such.tensor"), nullptr);
}

INSTANTIATE_TEST_SUITE_P(GgufAlignments, GgufTensorRoundTrip, ::testing::Values(32, 64));

// The bytes of a small file written out by hand from the format description: the reader must
// understand them and the writer must produce exactly them.
TEST(GgufBytes, HandWrittenFileMatchesReaderAndWriter) {
  Bytes b;
  b.raw("GGUF", 4).u32(3);
  b.u64(1);  // tensors
  b.u64(1);  // metadata keys
  b.str("general.name").u32(8).str("tiny");
  b.str("w").u32(2).u64(3).u64(2).u32(0).u64(0);  // F32 [3, 2] at offset 0
  ASSERT_EQ(b.s.size(), 24u + (8 + 12 + 4 + 8 + 4) + (8 + 1 + 4 + 16 + 4 + 8));
  b.pad_to(32);  // 101 -> 128
  ASSERT_EQ(b.s.size(), 128u);
  const float values[6] = {1.0f, -2.0f, 0.5f, 3.25f, -0.0f, 1e-3f};
  for (float v : values) b.f32(v);
  b.pad_to(32);  // 24 data bytes + 8 zero bytes
  ASSERT_EQ(b.s.size(), 160u);

  std::vector<uint8_t> keep;
  File f = parse_exact(b.s, keep, "hand.gguf");
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.data_offset(), 128u);
  ASSERT_EQ(f.metadata().size(), 1u);
  EXPECT_EQ(f.metadata()[0].first, "general.name");
  EXPECT_EQ(f.get_string("general.name"), "tiny");
  ASSERT_EQ(f.tensors().size(), 1u);
  const TensorInfo& t = f.tensors()[0];
  EXPECT_EQ(t.name, "w");
  EXPECT_EQ(t.ne, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(t.type, 0u);
  EXPECT_EQ(t.offset, 0u);
  EXPECT_EQ(t.nbytes, 24u);
  EXPECT_EQ(t.n_elements(), 6);
  EXPECT_EQ(t.data, keep.data() + 128);
  float got[6];
  std::memcpy(got, t.data, sizeof(got));
  for (int k = 0; k < 6; ++k) EXPECT_EQ(std::memcmp(&got[k], &values[k], 4), 0) << k;

  Writer w;
  w.set("general.name", Value::string("tiny"));
  w.add_tensor("w", {3, 2}, QuantType::F32);
  EXPECT_EQ(w.header_bytes(), b.s.substr(0, 128));
  EXPECT_EQ(w.total_bytes(), 160u);
  TempDir dir;
  const std::string path = dir.file("hand.gguf");
  w.write(path, [&](size_t, const TensorInfo& info, ktune::gguf::ByteSink& out) {
    out.write(values, info.nbytes);
  });
  EXPECT_EQ(read_all(path), b.s);
}

TEST(GgufWriter, RejectsBadDeclarationsAndCallbacks) {
  Writer w;
  w.add_tensor("a", {32}, QuantType::Q8_0);
  EXPECT_THROW(w.add_tensor("a", {32}, QuantType::F32), ktune::Error);   // duplicate
  EXPECT_THROW(w.add_tensor("b", {33}, QuantType::Q4_0), ktune::Error);  // partial block
  EXPECT_THROW(w.add_tensor("c", {1, 1, 1, 1, 1}, QuantType::F32), ktune::Error);
  EXPECT_THROW(w.add_tensor("d", {-1}, QuantType::F32), ktune::Error);
  EXPECT_THROW(w.add_tensor("e", {int64_t{1} << 40, int64_t{1} << 40}, QuantType::F32),
               ktune::Error);
  EXPECT_THROW(w.add_tensor("f", {4}, static_cast<QuantType>(31)), ktune::Error);  // removed
  EXPECT_THROW(w.add_tensor("g", {4}, static_cast<QuantType>(1000)), ktune::Error);
  EXPECT_THROW(w.set_alignment(48), ktune::Error);
  EXPECT_THROW(w.set_alignment(0), ktune::Error);
  EXPECT_THROW(w.set("", Value::u8(1)), ktune::Error);
  Value bad = Value::make_array(ValueType::INT32, {});
  bad.array.push_back(Value::string("not an int"));  // bypasses make_array's check
  EXPECT_THROW(w.set("bad", bad), ktune::Error);

  TempDir dir;
  const std::string path = dir.file("out.gguf");
  auto too_short = [](size_t, const TensorInfo& info, ktune::gguf::ByteSink& out) {
    std::vector<uint8_t> z(static_cast<size_t>(info.nbytes - 1));
    out.write(z.data(), z.size());
  };
  auto too_long = [](size_t, const TensorInfo& info, ktune::gguf::ByteSink& out) {
    std::vector<uint8_t> z(static_cast<size_t>(info.nbytes + 1));
    out.write(z.data(), z.size());
  };
  for (const auto& fill : {Writer::TensorFiller(too_short), Writer::TensorFiller(too_long)}) {
    try {
      w.write(path, fill);
      ADD_FAILURE() << "no error";
    } catch (const ktune::Error& e) {
      EXPECT_NE(std::string(e.what()).find("tensor 'a'"), std::string::npos) << e.what();
    }
    // Nothing is left behind: no output, no temporary file.
    EXPECT_TRUE(fs::is_empty(dir.path()));
  }
}

TEST(GgufWriter, ProgressAtLeastEvery64MiB) {
  TempDir dir;
  Writer small;
  small.add_tensor("big", {int64_t{130} << 20}, static_cast<QuantType>(24));  // I8: 130 MiB
  std::vector<uint64_t> done;
  const std::string path = dir.file("big.gguf");
  small.write(
      path,
      [](size_t, const TensorInfo& info, ktune::gguf::ByteSink& out) {
        std::vector<uint8_t> z(static_cast<size_t>(info.nbytes));  // one huge write
        out.write(z.data(), z.size());
      },
      [&](uint64_t d, uint64_t total) {
        EXPECT_EQ(total, small.total_bytes());
        done.push_back(d);
      });
  ASSERT_GE(done.size(), 3u);
  uint64_t prev = 0;
  for (uint64_t d : done) {
    EXPECT_LE(d - prev, uint64_t{64} << 20);
    prev = d;
  }
  EXPECT_EQ(done.back(), small.total_bytes());
  EXPECT_EQ(fs::file_size(path), small.total_bytes());
}

// --- hostile inputs ------------------------------------------------------------------------

TEST(GgufHostile, OpenErrors) {
  TempDir dir;
  auto expect_open_error = [](const std::string& path, const std::string& needle) {
    try {
      File::open(path);
      ADD_FAILURE() << "no error for " << path;
    } catch (const ktune::Error& e) {
      EXPECT_EQ(e.where(), path);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_FALSE(e.fix().empty());
    }
  };
  expect_open_error(dir.file("missing.gguf"), "does not exist");
  expect_open_error(dir.path(), "is a folder");
  write_all(dir.file("empty.gguf"), "");
  expect_open_error(dir.file("empty.gguf"), "empty");
  write_all(dir.file("text.gguf"), "hello world, not a model");
  expect_open_error(dir.file("text.gguf"), "not a GGUF file");
  if (::geteuid() != 0) {  // root reads anything
    write_all(dir.file("locked.gguf"), "GGUF");
    ::chmod(dir.file("locked.gguf").c_str(), 0);
    expect_open_error(dir.file("locked.gguf"), "cannot read");
  }
}

TEST(GgufHostile, HeaderProblems) {
  expect_error("", "empty");
  expect_error("GGU", "truncated");
  expect_error("GGML\x03\0\0\0", "not a GGUF file");
  expect_error(raw_gguf(0, 0, "", {}, 0, 2), "version 2 is not supported");
  expect_error(raw_gguf(0, 0, "", {}, 0, 1), "version 1 is not supported");
  expect_error(raw_gguf(0, 0, "", {}, 0, 0x03000000u), "big-endian");
  expect_error(raw_gguf(0, 0, "", {}, 0, 7), "unknown GGUF version 7");
  expect_error(raw_gguf(uint64_t{1} << 60, 0, "", {}, 0), "claims 1152921504606846976 tensors");
  expect_error(raw_gguf(0, uint64_t{1} << 60, "", {}, 0),
               "claims 1152921504606846976 metadata keys");
  expect_error(raw_gguf(std::numeric_limits<uint64_t>::max(), std::numeric_limits<uint64_t>::max(),
                        "", {}, 0),
               "tensors");
}

TEST(GgufHostile, MetadataProblems) {
  // Key length far beyond the file.
  expect_error(raw_gguf(0, 1, Bytes().u64(uint64_t{1} << 62).s, {}, 64), "claims");
  // String value length beyond the file.
  expect_error(raw_gguf(0, 1, Bytes().str("k").u32(8).u64(1000000).s, {}, 64), "'k' at offset");
  expect_error(raw_gguf(0, 1, Bytes().str("k").u32(13).u32(0).s, {}, 64), "unknown value type 13");
  expect_error(raw_gguf(0, 1, Bytes().str("k").u32(9).u32(99).u64(0).s, {}, 64),
               "unknown array element type 99");
  expect_error(raw_gguf(0, 1, Bytes().str("k").u32(9).u32(4).u64(uint64_t{1} << 60).s, {}, 64),
               "claims an array of 1152921504606846976 uint32");
  expect_error(raw_gguf(0, 1, Bytes().str("k").u32(7).u8(2).s, {}, 64), "bool byte of 2");
  // Nesting bomb: arrays of one array, 1000 levels deep.
  Bytes bomb;
  bomb.str("bomb").u32(9);
  for (int k = 0; k < 1000; ++k) bomb.u32(9).u64(1);
  bomb.u32(0).u64(0);
  expect_error(raw_gguf(0, 1, bomb.s, {}, 0), "nests arrays more than 8 levels");
  // Seven levels are fine.
  Bytes ok;
  ok.str("deep").u32(9);
  for (int k = 0; k < 6; ++k) ok.u32(9).u64(1);
  ok.u32(0).u64(1).u8(7);
  std::vector<uint8_t> keep;
  File deep = parse_exact(raw_gguf(0, 1, ok.s, {}, 0), keep);
  const Value* v = deep.find("deep");
  ASSERT_NE(v, nullptr);
  for (int k = 0; k < 6; ++k) v = &v->array.at(0);
  EXPECT_EQ(v->array.at(0).u, 7u);

  const std::string kv_a = Bytes().str("a").u32(4).u32(1).s;
  expect_error(raw_gguf(0, 2, kv_a + kv_a, {}, 0), "'a' appears twice");
  expect_error(raw_gguf(0, 1, Bytes().str("").u32(4).u32(1).s, {}, 0), "is empty");
  expect_error(raw_gguf(0, 1, Bytes().str("general.alignment").u32(4).u32(48).s, {}, 0),
               "general.alignment is 48");
  expect_error(raw_gguf(0, 1, Bytes().str("general.alignment").u32(4).u32(0).s, {}, 0),
               "general.alignment is 0");
  expect_error(raw_gguf(0, 1, Bytes().str("general.alignment").u32(8).str("32").s, {}, 0),
               "general.alignment is a string");
}

TEST(GgufHostile, TensorInfoProblems) {
  expect_error(one_tensor({"w", {8}, 0, 0}, 16), "past the end of the file");
  expect_error(one_tensor({"w", {8}, 0, uint64_t{1} << 63}, 64), "past the end of the file");
  expect_error(one_tensor({"w", {8}, 0, std::numeric_limits<uint64_t>::max() - 31}, 64),
               "past the end");
  expect_error(one_tensor({"w", {8}, 0, 8}, 64), "offset 8, not a multiple of the alignment 32");
  expect_error(one_tensor({"w", {8}, 77, 0}, 64), "unknown ggml type id 77");
  expect_error(one_tensor({"w", {8}, 0xffffffffu, 0}, 64), "unknown ggml type id 4294967295");
  expect_error(one_tensor({"w", {32}, 31, 0}, 64), "Q4_0_4_4");
  expect_error(one_tensor({"w", {1, 1, 1, 1, 1}, 0, 0}, 64), "5 dimensions");
  expect_error(one_tensor({"w", {}, 0, 0}, 64), "0 dimensions");
  expect_error(
      one_tensor({"w", {uint64_t{1} << 32, uint64_t{1} << 32, uint64_t{1} << 32}, 0, 0}, 64),
      "overflows 64 bits");
  expect_error(one_tensor({"w", {uint64_t{1} << 62, 4}, 0, 0}, 64), "overflows");
  expect_error(one_tensor({"w", {static_cast<uint64_t>(-1)}, 0, 0}, 64), "negative size -1");
  expect_error(one_tensor({"w", {31}, 2, 0}, 64), "not a multiple of the type's block of 32");
  expect_error(one_tensor({"w", {300}, 12, 0}, 1024), "Q4_K has rows of 300");
  // Claimed dimension count beyond the file.
  expect_error(one_tensor({"w", {8}, 0, 0, 3}, 0), "");
  expect_error(raw_gguf(2, 0, "", {{"w", {8}, 0, 0}, {"w", {8}, 0, 32}}, 64),
               "two tensors are named 'w'");
  expect_error(raw_gguf(2, 0, "", {{"a", {16}, 0, 0}, {"b", {8}, 0, 32}}, 64),
               "'a' and 'b' overlap");
  // Tensor infos missing although the count promises them.
  expect_error(raw_gguf(3, 0, "", {{"a", {8}, 0, 0}}, 0), "");

  // Known ggml types ktune does not compute with are kept, not rejected.
  std::vector<uint8_t> keep;
  File f = parse_exact(
      raw_gguf(2, 0, "", {{"q4k", {256, 2}, 12, 0}, {"iq2", {256}, 16, 288}}, 288 + 66 + 30), keep);
  ASSERT_EQ(f.tensors().size(), 2u);
  EXPECT_EQ(f.tensors()[0].type, 12u);
  EXPECT_EQ(f.tensors()[0].nbytes, 288u);
  EXPECT_EQ(f.tensors()[1].type, 16u);
  EXPECT_EQ(f.tensors()[1].nbytes, 66u);
  // Zero-sized tensors are legal.
  File z = parse_exact(raw_gguf(1, 0, "", {{"z", {0, 5}, 0, 0}}, 0), keep);
  EXPECT_EQ(z.tensors()[0].nbytes, 0u);
}

TEST(GgufHostile, EveryTruncationIsAnError) {
  TempDir dir;
  const std::string good = small_valid_file(dir);
  {
    std::vector<uint8_t> keep;
    File f = parse_exact(good, keep);  // the whole file is fine
    EXPECT_EQ(f.tensors().size(), 3u);
  }
  for (size_t len = 0; len < good.size(); ++len) {
    std::vector<uint8_t> keep(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(len));
    try {
      File::from_memory(keep.data(), keep.size(), "cut.gguf");
      ADD_FAILURE() << "a prefix of " << len << " of " << good.size() << " bytes parsed";
    } catch (const ktune::Error& e) {
      EXPECT_EQ(e.where(), "cut.gguf");
    }
  }
}

TEST(GgufHostile, RandomMutationsOnlyThrowKtuneError) {
  TempDir dir;
  const std::string good = small_valid_file(dir);
  std::mt19937_64 rng(20251127);
  int parsed = 0, rejected = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::vector<uint8_t> buf(good.begin(), good.end());
    const int n_mut = 1 + static_cast<int>(rng() % 4);
    for (int m = 0; m < n_mut && !buf.empty(); ++m) {
      const size_t at = rng() % buf.size();
      switch (rng() % 6) {
        case 0:  // random byte
          buf[at] = static_cast<uint8_t>(rng());
          break;
        case 1:  // bit flip
          buf[at] ^= static_cast<uint8_t>(1u << (rng() % 8));
          break;
        case 2: {  // a huge or tiny 64-bit value, often hitting a count or a length
          const uint64_t vals[] = {0,
                                   1,
                                   0xffffffffffffffffull,
                                   uint64_t{1} << 60,
                                   uint64_t{1} << 32,
                                   0x7fffffffffffffffull,
                                   rng()};
          const uint64_t v = vals[rng() % std::size(vals)];
          const size_t n = std::min<size_t>(8, buf.size() - at);
          std::memcpy(buf.data() + at, &v, n);
          break;
        }
        case 3:  // truncate
          buf.resize(at);
          break;
        case 4:  // delete a byte
          buf.erase(buf.begin() + static_cast<std::ptrdiff_t>(at));
          break;
        default:  // insert a byte
          buf.insert(buf.begin() + static_cast<std::ptrdiff_t>(at), static_cast<uint8_t>(rng()));
          break;
      }
    }
    buf.shrink_to_fit();
    try {
      File f = File::from_memory(buf.data(), buf.size(), "mutated.gguf");
      // Whatever parsed must be safe to use.
      for (const TensorInfo& t : f.tensors()) {
        uint64_t sum = 0;
        for (uint64_t k = 0; k < t.nbytes; ++k) sum += t.data[k];
        (void)sum;
      }
      ++parsed;
    } catch (const ktune::Error& e) {
      EXPECT_EQ(e.where(), "mutated.gguf");
      ++rejected;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "iteration " << iter << ": non-ktune exception: " << e.what();
    }
  }
  EXPECT_GT(rejected, 0);
  EXPECT_EQ(parsed + rejected, 4000);
}

}  // namespace
