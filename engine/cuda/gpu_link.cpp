// The transports of the multi-GPU layer split (ktune/engine/cuda/gpu_link.h) and NCCL's RAII
// handles (ktune/engine/cuda/nccl_check.h, compiled only with KTUNE_WITH_NCCL).
#include "ktune/engine/cuda/gpu_link.h"

#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/error.h"
#if KTUNE_WITH_NCCL
#include "ktune/engine/cuda/nccl_check.h"
#endif

namespace ktune::cuda {
namespace {

// Restores the calling thread's current device when it goes out of scope.
class DeviceGuard {
 public:
  DeviceGuard() { KTUNE_CUDA_CHECK(cudaGetDevice(&saved_)); }
  ~DeviceGuard() { cudaSetDevice(saved_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int saved_ = 0;
};

bool env_set(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1';
}

void check_ranks(const std::vector<int>& devices, const std::vector<cudaStream_t>& streams) {
  if (devices.size() < 2 || devices.size() != streams.size()) {
    throw Error("gpu link",
                std::to_string(devices.size()) + " devices and " +
                    std::to_string(streams.size()) + " streams",
                "give two or more devices, one stream each");
  }
}

// ---- peer --------------------------------------------------------------------------------

class PeerLink final : public GpuLink {
 public:
  PeerLink(const std::vector<int>& devices, const std::vector<cudaStream_t>& streams,
           const std::vector<std::pair<int, int>>& pairs, size_t max_bytes, bool allow_p2p)
      : devices_(devices), streams_(streams), max_bytes_(max_bytes) {
    check_ranks(devices, streams);
    DeviceGuard guard;
    const bool p2p_off = !allow_p2p || env_set("NCCL_P2P_DISABLE") || env_set("KTUNE_P2P_DISABLE");
    for (const auto& [from, to] : pairs) {
      if (from < 0 || to < 0 || from >= int(devices.size()) || to >= int(devices.size()) ||
          from == to) {
        throw Error("gpu link", "pair " + std::to_string(from) + "->" + std::to_string(to),
                    "name two different ranks");
      }
      if (links_.count({from, to})) continue;
      Pair p;
      const int a = devices[size_t(from)], b = devices[size_t(to)];
      int can = 0;
      if (!p2p_off) KTUNE_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, a, b));  // a reaches b
      if (can) {
        // The copy runs on from's stream: from's device must reach to's memory.
        KTUNE_CUDA_CHECK(cudaSetDevice(a));
        const cudaError_t e = cudaDeviceEnablePeerAccess(b, 0);
        if (e == cudaErrorPeerAccessAlreadyEnabled) {
          cudaGetLastError();
        } else {
          KTUNE_CUDA_CHECK(e);
        }
        p.p2p = true;
      } else {
        p.host = std::make_unique<PinnedBuffer>(max_bytes);
      }
      KTUNE_CUDA_CHECK(cudaSetDevice(b));
      p.dst_free = std::make_unique<Event>(false);
      KTUNE_CUDA_CHECK(cudaSetDevice(a));
      p.data_there = std::make_unique<Event>(false);
      links_.emplace(std::make_pair(from, to), std::move(p));
    }
  }

  void copy(int from, const void* src, int to, void* dst, size_t bytes) override {
    auto it = links_.find({from, to});
    if (it == links_.end() || bytes > max_bytes_) {
      throw Error("gpu link",
                  "copy " + std::to_string(from) + "->" + std::to_string(to) + " of " +
                      std::to_string(bytes) + " bytes was not planned",
                  "create the link with this pair and a max_bytes that covers it");
    }
    Pair& p = it->second;
    DeviceGuard guard;
    const int a = devices_[size_t(from)], b = devices_[size_t(to)];
    cudaStream_t sa = streams_[size_t(from)], sb = streams_[size_t(to)];
    KTUNE_CUDA_CHECK(cudaSetDevice(b));
    KTUNE_CUDA_CHECK(cudaEventRecord(*p.dst_free, sb));
    KTUNE_CUDA_CHECK(cudaSetDevice(a));
    KTUNE_CUDA_CHECK(cudaStreamWaitEvent(sa, *p.dst_free, 0));
    if (p.p2p) {
      KTUNE_CUDA_CHECK(cudaMemcpyPeerAsync(dst, b, src, a, bytes, sa));
    } else {
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(p.host->ptr, src, bytes, cudaMemcpyDeviceToHost, sa));
    }
    KTUNE_CUDA_CHECK(cudaEventRecord(*p.data_there, sa));
    KTUNE_CUDA_CHECK(cudaSetDevice(b));
    KTUNE_CUDA_CHECK(cudaStreamWaitEvent(sb, *p.data_there, 0));
    // The host buffer is reused by the next copy of this pair only after that copy's dst_free,
    // recorded on sb behind this host-to-device copy: no overwrite while it is read.
    if (!p.p2p) KTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, p.host->ptr, bytes, cudaMemcpyHostToDevice, sb));
  }

  GpuTransport kind() const override { return GpuTransport::Peer; }

  std::string describe() const override {
    int n_p2p = 0;
    std::string staged;
    for (const auto& [k, p] : links_) {
      if (p.p2p) {
        ++n_p2p;
      } else {
        staged += (staged.empty() ? "" : ",") + std::to_string(devices_[size_t(k.first)]) + "->" +
                  std::to_string(devices_[size_t(k.second)]);
      }
    }
    if (staged.empty()) return "peer (P2P)";
    if (n_p2p == 0) return "peer (staged through host)";
    return "peer (P2P, staged through host " + staged + ")";
  }

 private:
  struct PinnedBuffer {
    explicit PinnedBuffer(size_t bytes) { KTUNE_CUDA_CHECK(cudaMallocHost(&ptr, bytes > 0 ? bytes : 1)); }
    ~PinnedBuffer() { cudaFreeHost(ptr); }
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    void* ptr = nullptr;
  };
  struct Pair {
    bool p2p = false;
    std::unique_ptr<PinnedBuffer> host;       // staging without peer access
    std::unique_ptr<Event> dst_free;          // on to's device
    std::unique_ptr<Event> data_there;        // on from's device
  };
  std::vector<int> devices_;
  std::vector<cudaStream_t> streams_;
  size_t max_bytes_;
  std::map<std::pair<int, int>, Pair> links_;
};

}  // namespace

std::unique_ptr<GpuLink> make_peer_link(const std::vector<int>& devices,
                                        const std::vector<cudaStream_t>& streams,
                                        const std::vector<std::pair<int, int>>& pairs,
                                        size_t max_bytes, bool allow_p2p) {
  return std::make_unique<PeerLink>(devices, streams, pairs, max_bytes, allow_p2p);
}

// ---- nccl --------------------------------------------------------------------------------

#if KTUNE_WITH_NCCL

void nccl_check(ncclResult_t r, const char* call, const char* file, int line) {
  if (r == ncclSuccess) return;
  const std::string where = std::string(file) + ":" + std::to_string(line);
  const char* last = ncclGetLastError(nullptr);
  throw Error(where,
              std::string(call) + " failed: " + ncclGetErrorString(r) +
                  (last && *last ? std::string(" (") + last + ")" : std::string()),
              "run with NCCL_DEBUG=WARN for NCCL's reason; NCCL_P2P_DISABLE=1 rules out peer "
              "access, or use --gpu-transport peer");
}

NcclComms::NcclComms(const std::vector<int>& devices) : comms_(devices.size(), nullptr) {
  if (devices.empty()) return;
  KTUNE_NCCL_CHECK(
      ncclCommInitAll(comms_.data(), static_cast<int>(devices.size()), devices.data()));
}
NcclComms::~NcclComms() { destroy(); }
NcclComms::NcclComms(NcclComms&& o) noexcept : comms_(std::move(o.comms_)) { o.comms_.clear(); }
NcclComms& NcclComms::operator=(NcclComms&& o) noexcept {
  if (this != &o) {
    destroy();
    comms_ = std::move(o.comms_);
    o.comms_.clear();
  }
  return *this;
}
void NcclComms::destroy() noexcept {
  for (ncclComm_t c : comms_) {
    if (c) ncclCommDestroy(c);
  }
  comms_.clear();
}

NcclGroup::NcclGroup() {
  KTUNE_NCCL_CHECK(ncclGroupStart());
  open_ = true;
}
NcclGroup::~NcclGroup() {
  if (open_) ncclGroupEnd();
}
void NcclGroup::end() {
  open_ = false;
  KTUNE_NCCL_CHECK(ncclGroupEnd());
}

namespace {

class NcclLink final : public GpuLink {
 public:
  NcclLink(const std::vector<int>& devices, const std::vector<cudaStream_t>& streams)
      : streams_(streams) {
    check_ranks(devices, streams);
    DeviceGuard guard;
    comms_ = NcclComms(devices);
  }
  ~NcclLink() override {
    // ncclCommDestroy may not run while a stream still has our kernels in flight.
    DeviceGuard guard;
    for (cudaStream_t s : streams_) cudaStreamSynchronize(s);
  }

  void copy(int from, const void* src, int to, void* dst, size_t bytes) override {
    const int n = static_cast<int>(comms_.size());
    if (from < 0 || to < 0 || from >= n || to >= n || from == to) {
      throw Error("gpu link", "pair " + std::to_string(from) + "->" + std::to_string(to),
                  "name two different ranks");
    }
    DeviceGuard guard;
    NcclGroup group;  // one thread, two devices: the send and the receive in one group
    KTUNE_NCCL_CHECK(ncclSend(src, bytes, ncclUint8, to, comms_[size_t(from)], streams_[size_t(from)]));
    KTUNE_NCCL_CHECK(ncclRecv(dst, bytes, ncclUint8, from, comms_[size_t(to)], streams_[size_t(to)]));
    group.end();
  }

  GpuTransport kind() const override { return GpuTransport::Nccl; }
  std::string describe() const override { return "nccl"; }

 private:
  std::vector<cudaStream_t> streams_;
  NcclComms comms_;
};

}  // namespace

bool nccl_built() { return true; }

std::unique_ptr<GpuLink> make_nccl_link(const std::vector<int>& devices,
                                        const std::vector<cudaStream_t>& streams) {
  return std::make_unique<NcclLink>(devices, streams);
}

#else  // no NCCL in this build

bool nccl_built() { return false; }

std::unique_ptr<GpuLink> make_nccl_link(const std::vector<int>&, const std::vector<cudaStream_t>&) {
  throw Error("gpu transport nccl", "this ktune was built without NCCL",
              "use --gpu-transport peer (or auto), or rebuild where NCCL's nccl.h and libnccl "
              "are installed (cmake -DKTUNE_NCCL=ON)");
}

#endif

}  // namespace ktune::cuda
