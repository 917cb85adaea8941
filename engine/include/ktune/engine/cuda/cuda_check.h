// The CUDA backend's one error-check macro family and its RAII handles.
//
//   KTUNE_CUDA_CHECK(call)   throws ktune::Error naming the call, file:line and the CUDA error
//                            string when `call` (a cudaError_t expression) is not cudaSuccess;
//   KTUNE_CUDA_CHECK_LAST()  the same for cudaGetLastError() after a kernel launch.
//
// Handles: DeviceBuffer (one cudaMalloc, move-only), Stream, Event, and DeviceArena, the planned
// workspace: one cudaMalloc at load, then aligned bump allocation with reset(). Hot paths take
// pointers from an arena; nothing allocates per token.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace ktune::cuda {

// Throws ktune::Error when err != cudaSuccess. `call` is the source text of the call.
void check(cudaError_t err, const char* call, const char* file, int line);

#define KTUNE_CUDA_CHECK(call) ::ktune::cuda::check((call), #call, __FILE__, __LINE__)
#define KTUNE_CUDA_CHECK_LAST() \
  ::ktune::cuda::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// Device memory from one cudaMalloc, freed by the destructor. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  // `what` names the buffer in the error when the device is out of memory ("gpu engine
  // weights needs 17.1 GiB but only 3.2 GiB of 79.2 GiB is free").
  DeviceBuffer(size_t bytes, const std::string& what);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t size() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A non-blocking stream (cudaStreamNonBlocking), destroyed with its owner. Move-only.
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(Stream&& o) noexcept;
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  cudaStream_t get() const { return s_; }
  operator cudaStream_t() const { return s_; }
  void synchronize() const;

 private:
  cudaStream_t s_ = nullptr;
};

// A CUDA event; timing events by default (timing=false gives cudaEventDisableTiming, cheaper for
// pure ordering). Move-only.
class Event {
 public:
  // blocking_sync: synchronize() sleeps instead of spinning (cudaEventBlockingSync), for a host
  // thread that must not take a core from CPU workers while it waits.
  explicit Event(bool timing = true, bool blocking_sync = false);
  ~Event();
  Event(Event&& o) noexcept;
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  cudaEvent_t get() const { return e_; }
  operator cudaEvent_t() const { return e_; }
  void record(cudaStream_t s) const;
  void synchronize() const;
  // Milliseconds from `start` to this event (both recorded and complete).
  float elapsed_ms_since(const Event& start) const;

 private:
  cudaEvent_t e_ = nullptr;
};

// One cudaMalloc of `capacity` bytes up front; alloc() hands out aligned slices by bumping an
// offset, reset() gives everything back at once. alloc throws ktune::Error naming `name`, the
// request, the used and the total bytes when the arena is exhausted (a planning bug, not a
// user error, but it must never corrupt memory). Not thread-safe.
class DeviceArena {
 public:
  DeviceArena() = default;
  DeviceArena(size_t capacity, std::string name = "device arena");
  DeviceArena(DeviceArena&&) noexcept = default;
  DeviceArena& operator=(DeviceArena&&) noexcept = default;

  void* alloc(size_t bytes, size_t align = 256);
  template <class T>
  T* alloc_n(size_t n, size_t align = 256) {
    return static_cast<T*>(alloc(n * sizeof(T), align));
  }
  void reset() { used_ = 0; }
  size_t used() const { return used_; }
  size_t capacity() const { return buf_.size(); }

 private:
  DeviceBuffer buf_;
  size_t used_ = 0;
  std::string name_;
};

}  // namespace ktune::cuda
