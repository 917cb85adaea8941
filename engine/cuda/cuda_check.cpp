// Error checking and RAII handles of the CUDA backend (see ktune/engine/cuda/cuda_check.h).
#include "ktune/engine/cuda/cuda_check.h"

#include <cstdio>
#include <utility>

#include "ktune/engine/error.h"

namespace ktune::cuda {

namespace {

// "7.7 MiB" below a GiB, "17.1 GiB" above.
std::string mib_or_gib(size_t bytes) {
  char buf[48];
  const double b = static_cast<double>(bytes);
  if (bytes < (size_t{1} << 30)) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", b / 1048576.0);
  } else {
    std::snprintf(buf, sizeof buf, "%.1f GiB", b / 1073741824.0);
  }
  return buf;
}

// Out of memory is a user-level condition (another process holds the GPU's memory, or the
// placement asks for more than the GPU has): name the device, the need when known, and what is
// free, not a source line. cudaErrorMemoryAllocation is not sticky; it is cleared here.
// `what` is a buffer's name (need > 0), or a CUDA call (need 0; cudaMallocHost reports host
// pinned memory with the same code, so the call is named as it is).
[[noreturn]] void throw_out_of_memory(const std::string& what, size_t need) {
  cudaGetLastError();
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
  size_t free_b = 0, total_b = 0;
  const bool known = cudaMemGetInfo(&free_b, &total_b) == cudaSuccess;
  cudaGetLastError();
  const std::string device = dev >= 0 ? "cuda:" + std::to_string(dev) : "GPU";
  const std::string free_text =
      known ? mib_or_gib(free_b) + " of " + mib_or_gib(total_b) + " is free"
            : "free memory unknown";
  const std::string problem =
      need > 0 ? "out of GPU memory: " + what + " needs " + mib_or_gib(need) + " but only " +
                     free_text
               : what + " failed: out of memory (cudaErrorMemoryAllocation; on " + device +
                     " " + free_text + ")";
  throw Error(device, problem,
              "free GPU memory (other processes show in nvidia-smi), put fewer experts or layers "
              "on " + device + ", or lower the context");
}

}  // namespace

void check(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return;
  if (err == cudaErrorMemoryAllocation) throw_out_of_memory(call, 0);
  const std::string where = std::string(file) + ":" + std::to_string(line);
  std::string problem = std::string(call) + " failed: " + cudaGetErrorString(err) + " (" +
                        cudaGetErrorName(err) + ")";
  throw Error(where, problem,
              "check the GPU with nvidia-smi; run with CUDA_LAUNCH_BLOCKING=1 to locate an "
              "asynchronous failure");
}

// --- DeviceBuffer ---------------------------------------------------------------------------
DeviceBuffer::DeviceBuffer(size_t bytes) : DeviceBuffer(bytes, "a device buffer") {}
DeviceBuffer::DeviceBuffer(size_t bytes, const std::string& what) : bytes_(bytes) {
  if (bytes == 0) return;
  const cudaError_t err = cudaMalloc(&ptr_, bytes);
  if (err == cudaErrorMemoryAllocation) {
    ptr_ = nullptr;
    throw_out_of_memory(what, bytes);
  }
  KTUNE_CUDA_CHECK(err);
}
DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);
}
DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

// --- Stream ---------------------------------------------------------------------------------
Stream::Stream() { KTUNE_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
Stream::~Stream() {
  if (s_) cudaStreamDestroy(s_);
}
Stream::Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    if (s_) cudaStreamDestroy(s_);
    s_ = std::exchange(o.s_, nullptr);
  }
  return *this;
}
void Stream::synchronize() const { KTUNE_CUDA_CHECK(cudaStreamSynchronize(s_)); }

// --- Event ----------------------------------------------------------------------------------
Event::Event(bool timing, bool blocking_sync) {
  const unsigned flags = (timing ? cudaEventDefault : cudaEventDisableTiming) |
                         (blocking_sync ? cudaEventBlockingSync : 0u);
  KTUNE_CUDA_CHECK(cudaEventCreateWithFlags(&e_, flags));
}
Event::~Event() {
  if (e_) cudaEventDestroy(e_);
}
Event::Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    if (e_) cudaEventDestroy(e_);
    e_ = std::exchange(o.e_, nullptr);
  }
  return *this;
}
void Event::record(cudaStream_t s) const { KTUNE_CUDA_CHECK(cudaEventRecord(e_, s)); }
void Event::synchronize() const { KTUNE_CUDA_CHECK(cudaEventSynchronize(e_)); }
float Event::elapsed_ms_since(const Event& start) const {
  float ms = 0.0f;
  KTUNE_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
  return ms;
}

// --- DeviceArena ----------------------------------------------------------------------------
DeviceArena::DeviceArena(size_t capacity, std::string name)
    : buf_(capacity, name), name_(std::move(name)) {}

void* DeviceArena::alloc(size_t bytes, size_t align) {
  if (align == 0 || (align & (align - 1)) != 0) {
    throw Error(name_, "alignment " + std::to_string(align) + " is not a power of two",
                "pass a power-of-two alignment");
  }
  // Align the address, not only the offset: alignments above cudaMalloc's 256 bytes work too.
  const uintptr_t base = reinterpret_cast<uintptr_t>(buf_.data());
  const size_t start = ((base + used_ + align - 1) & ~(uintptr_t{align} - 1)) - base;
  if (start > buf_.size() || bytes > buf_.size() - start) {
    throw Error(name_,
                "out of device workspace: " + std::to_string(bytes) + " bytes requested with " +
                    std::to_string(used_) + " of " + std::to_string(buf_.size()) + " bytes in use",
                "the memory plan under-counted this workspace; plan a larger arena");
  }
  used_ = start + bytes;
  return static_cast<char*>(buf_.data()) + start;
}

}  // namespace ktune::cuda
