// Per-engine activation buffers shared by the CPU engines (cpu_engine.cpp for qwen3moe,
// cpu_engine_deepseek.cpp for deepseek2): cache-line aligned buffers and the quantized forms of
// one input for the weights that consume it. Private to engine/runtime.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/quant.h"

namespace ktune::rt {

constexpr int64_t kCacheLine = 64;

// A float or byte buffer aligned to a cache line and padded to whole lines, so buffers that
// different threads write never share a line.
template <class T>
class Buf {
 public:
  void resize(int64_t n) {
    n_ = n;
    const size_t bytes =
        ((std::max<int64_t>(n, 1) * sizeof(T) + kCacheLine - 1) / kCacheLine) * kCacheLine;
    data_.reset(static_cast<T*>(::operator new[](bytes, std::align_val_t(kCacheLine))));
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T& operator[](int64_t i) { return data_.get()[i]; }
  int64_t size() const { return n_; }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(kCacheLine)); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t n_ = 0;
};

// The activation forms of one input (rows of n floats) for the weights that consume it: one
// buffer per distinct quantized activation type; F32 activations are the floats themselves.
class ActBuffers {
 public:
  void init(const std::vector<QuantType>& weight_types, int64_t n, int64_t rows) {
    n_ = n;
    for (QuantType w : weight_types) {
      const QuantType a = cpu::activation_type(w);
      if (a == QuantType::F32) continue;
      bool have = false;
      for (const Entry& e : entries_) have = have || e.act == a;
      if (have) continue;
      Entry e;
      e.act = a;
      e.weight = w;
      e.row_bytes = row_bytes(a, n);
      e.block = block_elems(a);
      e.buf.resize(e.row_bytes * rows);
      std::memset(e.buf.data(), 0, static_cast<size_t>(e.row_bytes * rows));
      entries_.push_back(std::move(e));
    }
  }
  // Converts elements [c0, c1) of row r (x points at element c0); c0 and c1 are multiples of
  // every block size (or c1 == n).
  void quantize(const float* x, int64_t r, int64_t c0, int64_t c1, cpu::Isa isa) {
    for (Entry& e : entries_) {
      uint8_t* dst = e.buf.data() + r * e.row_bytes + row_bytes(e.act, c0);
      cpu::quantize_activation(e.weight, x, dst, c1 - c0, isa);
    }
  }
  void quantize_row(const float* x, int64_t r, cpu::Isa isa) { quantize(x, r, 0, n_, isa); }
  // Largest block size among the quantized forms (1 when all are F32).
  int64_t block() const {
    int64_t b = 1;
    for (const Entry& e : entries_) b = std::max(b, e.block);
    return b;
  }
  // Rows for weight type w: base pointer and stride in bytes. floats/float_stride describe the
  // float rows used when w multiplies with F32 activations.
  const uint8_t* rows(QuantType w, const float* floats) const {
    const QuantType a = cpu::activation_type(w);
    if (a == QuantType::F32) return reinterpret_cast<const uint8_t*>(floats);
    for (const Entry& e : entries_) {
      if (e.act == a) return e.buf.data();
    }
    return nullptr;  // unreachable: init saw every weight type
  }
  int64_t stride(QuantType w) const {
    const QuantType a = cpu::activation_type(w);
    if (a == QuantType::F32) return n_ * static_cast<int64_t>(sizeof(float));
    for (const Entry& e : entries_) {
      if (e.act == a) return e.row_bytes;
    }
    return 0;
  }

 private:
  struct Entry {
    QuantType act = QuantType::F32;
    QuantType weight = QuantType::F32;
    int64_t row_bytes = 0;
    int64_t block = 1;
    Buf<uint8_t> buf;
  };
  std::vector<Entry> entries_;
  int64_t n_ = 0;
};

}  // namespace ktune::rt
