// NCCL's half of the CUDA backend's error-check family and its RAII handles (design §7.4-5).
// Only for builds with NCCL (KTUNE_WITH_NCCL); include it from .cpp files that are compiled
// only then (engine/cuda/gpu_link.cpp guards its use).
//
//   KTUNE_NCCL_CHECK(call)   throws ktune::Error naming the call, file:line and NCCL's error
//                            string when `call` (an ncclResult_t expression) is not ncclSuccess.
//
// Handles: NcclComms (one communicator per device of this process, ncclCommInitAll, destroyed
// together) and NcclGroup (ncclGroupStart ... ncclGroupEnd: one thread driving several devices
// must group their calls, or a call may block waiting for a peer that is never launched).
#pragma once

#include <nccl.h>

#include <vector>

namespace ktune::cuda {

void nccl_check(ncclResult_t r, const char* call, const char* file, int line);

#define KTUNE_NCCL_CHECK(call) ::ktune::cuda::nccl_check((call), #call, __FILE__, __LINE__)

// Rank r of the communicators is devices[r]. Move-only; the destructor destroys every
// communicator (ncclCommDestroy; call it only once the streams that used them are idle).
class NcclComms {
 public:
  NcclComms() = default;
  explicit NcclComms(const std::vector<int>& devices);
  ~NcclComms();
  NcclComms(NcclComms&& o) noexcept;
  NcclComms& operator=(NcclComms&& o) noexcept;
  NcclComms(const NcclComms&) = delete;
  NcclComms& operator=(const NcclComms&) = delete;

  ncclComm_t operator[](size_t rank) const { return comms_[rank]; }
  size_t size() const { return comms_.size(); }

 private:
  void destroy() noexcept;
  std::vector<ncclComm_t> comms_;
};

// ncclGroupStart() at construction; end() calls ncclGroupEnd() and checks it. A group left by an
// exception is closed by the destructor (its result ignored: the first error is the one thrown).
class NcclGroup {
 public:
  NcclGroup();
  ~NcclGroup();
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  void end();

 private:
  bool open_ = false;
};

}  // namespace ktune::cuda
