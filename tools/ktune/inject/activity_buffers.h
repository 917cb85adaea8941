// The activity buffers ktune hands to CUPTI (cuptiActivityRegisterCallbacks), shared by the
// engine's CuptiSession and the injection library. Header-only plain C++ (no CUPTI).
//
// Two host costs of the naive scheme (a fresh malloc per request, free after parsing) land on the
// traced program's own threads, because CUPTI requests a buffer from the thread whose per-thread
// buffer just filled: CUPTI zeroes every buffer it gets before filling it (unless told the client
// does, CUPTI_ACTIVITY_ATTR_ZEROED_OUT_ACTIVITY_BUFFER), and a fresh 8 MiB allocation faults its
// pages in as they are first written. So buffers are zeroed here after parsing, on the thread
// that completed them (CUPTI's worker thread), and kept for reuse; a request takes a zeroed one
// from the pool or a calloc'ed one (zero pages from the kernel).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace ktune::exec_capture {

class ActivityBufferPool {
 public:
  // bytes per buffer; at most max_in_flight handed out at once (beyond, CUPTI drops records and
  // counts them); up to `keep` returned buffers are kept, zeroed, for reuse.
  ActivityBufferPool(size_t bytes, size_t max_in_flight, size_t keep)
      : bytes_(bytes), max_in_flight_(max_in_flight), keep_(keep) {}
  ~ActivityBufferPool() {
    for (uint8_t* b : free_) std::free(b);
  }
  ActivityBufferPool(const ActivityBufferPool&) = delete;
  ActivityBufferPool& operator=(const ActivityBufferPool&) = delete;

  size_t bytes() const { return bytes_; }

  // A zeroed buffer of bytes() bytes, or nullptr (too many in flight, or no memory).
  uint8_t* take() {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (in_flight_ >= max_in_flight_) return nullptr;
      ++in_flight_;
      if (!free_.empty()) {
        uint8_t* b = free_.back();
        free_.pop_back();
        return b;
      }
    }
    // calloc: zero pages, faulted in lazily; aligned for CUPTI (8 bytes) like malloc's.
    auto* b = static_cast<uint8_t*>(std::calloc(1, bytes_));
    if (b == nullptr) {
      std::lock_guard<std::mutex> l(mu_);
      --in_flight_;
    }
    return b;
  }

  // A buffer CUPTI completed (after its records were parsed): zeroed and kept, or freed.
  void give_back(uint8_t* b) {
    if (b == nullptr) return;  // not one of ours
    bool keep = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      keep = free_.size() < keep_;
    }
    if (keep) std::memset(b, 0, bytes_);  // off the program's threads: CUPTI's worker completes
    std::lock_guard<std::mutex> l(mu_);
    if (in_flight_ > 0) --in_flight_;
    if (keep) {
      free_.push_back(b);
    } else {
      std::free(b);
    }
  }

  // Buffers handed out and not yet returned (for tests).
  size_t in_flight() const {
    std::lock_guard<std::mutex> l(mu_);
    return in_flight_;
  }
  size_t kept() const {
    std::lock_guard<std::mutex> l(mu_);
    return free_.size();
  }

 private:
  size_t bytes_;
  size_t max_in_flight_;
  size_t keep_;
  mutable std::mutex mu_;
  size_t in_flight_ = 0;
  std::vector<uint8_t*> free_;
};

}  // namespace ktune::exec_capture
