// safetensors reader: a tiny checkpoint built in the test, and damaged headers that must end in
// ktune::Error naming the file.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/safetensors.h"

namespace {

namespace fs = std::filesystem;
using ktune::safetensors::File;

// u64 header length, JSON padded with spaces to a multiple of 8 (as the Python writer does),
// then the data.
std::string make_file(const std::string& json, const std::string& data, bool pad = true) {
  std::string header = json;
  if (pad) {
    while ((8 + header.size()) % 8) header += ' ';
  }
  const uint64_t n = header.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + header + data;
}

std::string raw_bytes(const void* p, size_t n) {
  return std::string(static_cast<const char*>(p), n);
}

struct Tiny {
  std::string bytes;
  std::vector<float> f32 = {1.0f, -2.5f, 0.0f, 3.0e5f, -1.0e-3f, 7.0f};
  std::vector<float> f16 = {0.5f, -1.0f, 2048.0f, 0.099975586f};  // exactly representable
  std::vector<float> bf16 = {1.0f, -3.0f, 256.0f};
};

Tiny make_tiny() {
  Tiny t;
  std::string data;
  data += raw_bytes(t.f32.data(), t.f32.size() * 4);  // 24 bytes at 0
  for (float v : t.f16) {
    const uint16_t h = ktune::fp32_to_fp16(v);
    data += raw_bytes(&h, 2);
  }  // 8 bytes at 24
  for (float v : t.bf16) {
    const uint16_t h = ktune::fp32_to_bf16(v);
    data += raw_bytes(&h, 2);
  }  // 6 bytes at 32
  const int32_t ints[2] = {-1, 5};
  data += raw_bytes(ints, 8);  // 8 bytes at 38
  // Written out of data order on purpose: the order in the data is free.
  t.bytes = make_file(R"({"__metadata__":{"format":"pt"},)"
                      R"("bf16":{"dtype":"BF16","shape":[3],"data_offsets":[32,38]},)"
                      R"("a.f32":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                      R"("h":{"dtype":"F16","shape":[2,1,2],"data_offsets":[24,32]},)"
                      R"("ints":{"dtype":"I32","shape":[2],"data_offsets":[38,46]},)"
                      R"("empty":{"dtype":"F32","shape":[0,4],"data_offsets":[46,46]},)"
                      R"("scalar_u8":{"dtype":"U8","shape":[],"data_offsets":[46,47]}})",
                      data + "\x09");
  return t;
}

File parse_exact(const std::string& bytes, std::vector<uint8_t>& keep) {
  keep.assign(bytes.begin(), bytes.end());
  return File::from_memory(keep.data(), keep.size(), "bad.safetensors");
}

void expect_error(const std::string& bytes, const std::string& needle) {
  std::vector<uint8_t> keep;
  try {
    parse_exact(bytes, keep);
    ADD_FAILURE() << "no error, expected one containing '" << needle << "'";
  } catch (const ktune::Error& e) {
    EXPECT_EQ(e.where(), "bad.safetensors");
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_FALSE(e.fix().empty());
  }
}

TEST(SafetensorsRoundTrip, F32F16BF16) {
  const Tiny t = make_tiny();
  const std::string path =
      (fs::temp_directory_path() / ("ktune_st_" + std::to_string(::getpid()) + ".safetensors"))
          .string();
  {
    std::ofstream out(path, std::ios::binary);
    out.write(t.bytes.data(), static_cast<std::streamsize>(t.bytes.size()));
  }
  File f = File::open(path);
  fs::remove(path);  // the mapping stays valid
  EXPECT_EQ(f.path(), path);
  ASSERT_EQ(f.tensors().size(), 6u);
  EXPECT_EQ(f.tensors()[0].name, "bf16");  // file order kept
  EXPECT_EQ(f.tensors()[1].name, "a.f32");

  const auto* a = f.find("a.f32");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, "F32");
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->nbytes, 24u);
  EXPECT_EQ(a->n_elements(), 6);
  EXPECT_EQ(f.read_f32("a.f32"), t.f32);
  EXPECT_EQ(f.read_f32("a.f32", {2, 3}), t.f32);
  EXPECT_EQ(f.read_f32("h", {2, 1, 2}), t.f16);
  EXPECT_EQ(f.read_f32("bf16"), t.bf16);
  EXPECT_TRUE(f.read_f32("empty").empty());
  EXPECT_EQ(f.find("scalar_u8")->n_elements(), 1);
  EXPECT_EQ(f.find("scalar_u8")->data[0], 9);
  EXPECT_EQ(f.find("nope"), nullptr);

  auto expect_read_error = [&](auto fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const ktune::Error& e) {
      EXPECT_EQ(e.where(), path);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_read_error([&] { f.read_f32("nope"); }, "'nope' is missing");
  expect_read_error([&] { f.read_f32("ints"); }, "dtype I32");
  expect_read_error([&] { f.read_f32("a.f32", {3, 2}); }, "shape [2, 3], expected [3, 2]");
}

TEST(SafetensorsHostile, OpenErrors) {
  const std::string dir =
      (fs::temp_directory_path() / ("ktune_st_dir_" + std::to_string(::getpid()))).string();
  fs::create_directories(dir);
  auto expect_open_error = [](const std::string& path, const std::string& needle) {
    try {
      File::open(path);
      ADD_FAILURE() << "no error for " << path;
    } catch (const ktune::Error& e) {
      EXPECT_EQ(e.where(), path);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_open_error(dir + "/missing.safetensors", "does not exist");
  expect_open_error(dir, "is a folder");
  { std::ofstream(dir + "/empty.safetensors"); }
  expect_open_error(dir + "/empty.safetensors", "empty");
  fs::remove_all(dir);
}

TEST(SafetensorsHostile, DamagedFiles) {
  const Tiny t = make_tiny();
  // Every strict prefix is damaged somewhere (header or data).
  for (size_t len = 0; len + 1 < t.bytes.size(); ++len) {
    std::vector<uint8_t> keep(t.bytes.begin(), t.bytes.begin() + static_cast<std::ptrdiff_t>(len));
    EXPECT_THROW(File::from_memory(keep.data(), keep.size(), "cut"), ktune::Error) << len;
  }
  expect_error("abc", "fewer than the 8-byte header length");
  {
    const uint64_t huge = uint64_t{1} << 40;
    expect_error(raw_bytes(&huge, 8) + "{}", "above the format's limit");
    const uint64_t big = 1000;
    expect_error(raw_bytes(&big, 8) + "{}", "the header needs 1000 bytes");
  }
  expect_error(make_file("{\"a\": ", ""), "not valid JSON");
  expect_error(make_file("{\"a\": 1} trailing", ""), "not valid JSON");
  expect_error(make_file("[1, 2]", ""), "not an object");
  expect_error(make_file(std::string(5000, '[') + std::string(5000, ']'), ""), "nests deeper");
  expect_error(make_file(R"({"a": 5})", ""), "'a' is not described by a JSON object");
  expect_error(make_file(R"({"a": {"dtype": "F32", "shape": [1]}})", "xxxx"),
               "lacks one of dtype, shape, data_offsets");
  expect_error(make_file(R"({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}})", "xxxx"),
               "unknown dtype 'F7'");
  expect_error(
      make_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", "xxxxxxxx"),
      "needs 8 bytes but data_offsets span 4");
  expect_error(
      make_file(R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", "xxxx"),
      "not a non-negative integer");
  expect_error(
      make_file(R"({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", "xxxx"),
      "not a non-negative integer");
  expect_error(make_file(R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 16],)"
                         R"( "data_offsets": [0, 4]}})",
                         "xxxx"),
               "overflows 64 bits");
  expect_error(make_file(R"({"a": {"dtype": "F64", "shape": [2305843009213693952],)"
                         R"( "data_offsets": [0, 4]}})",
                         "xxxx"),
               "more than 2^64");
  expect_error(
      make_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})", "xxxx"),
      "the data has 4 bytes");
  expect_error(
      make_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", "xxxx"),
      "end before they begin");
  expect_error(make_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", "xxxx"),
               "not a pair");
  expect_error(make_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                         R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                         "xxxxxxxx"),
               "overlap");
  expect_error(make_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                         R"( "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                         "xxxxxxxx"),
               "names tensor 'a' twice");
  expect_error(make_file(R"({"__metadata__": 3})", ""), "__metadata__ is not a JSON object");
}

TEST(SafetensorsHostile, RandomMutationsOnlyThrowKtuneError) {
  const Tiny t = make_tiny();
  uint64_t state = 12345;
  auto next = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state >> 33;
  };
  for (int iter = 0; iter < 2000; ++iter) {
    std::vector<uint8_t> buf(t.bytes.begin(), t.bytes.end());
    for (int m = 0; m < 3; ++m) buf[next() % buf.size()] = static_cast<uint8_t>(next());
    try {
      File f = File::from_memory(buf.data(), buf.size(), "m");
      for (const auto& tensor : f.tensors()) {
        if (tensor.dtype == "F32" || tensor.dtype == "F16" || tensor.dtype == "BF16") {
          f.read_f32(tensor.name);
        }
      }
    } catch (const ktune::Error&) {
    } catch (const std::exception& e) {
      ADD_FAILURE() << "iteration " << iter << ": non-ktune exception: " << e.what();
    }
  }
}

}  // namespace
