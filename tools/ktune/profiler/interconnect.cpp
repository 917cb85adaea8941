// Inter-GPU links for `ktune profile --hardware` (profiler/hardware.h, measure_interconnect).
//
// Per directed GPU pair (src -> dst): peer copies (cudaMemcpyPeerAsync on src's stream, with
// peer access enabled where the devices allow it; otherwise CUDA stages them through the host),
// bandwidth from a large copy and latency from 4-byte copies back to back on one stream (each
// waits for the one before, so the mean is the per-transfer cost); and NCCL send/recv when the
// library can be loaded. NCCL is opened with dlopen at run time, so ktune builds and runs without
// it and a machine without NCCL simply reports 0 (not measured). One GPU: nothing to measure.
#include <dlfcn.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "ktune/engine/error.h"
#include "profiler/hardware.h"

#if KTUNE_WITH_CUDA
#include <cuda_runtime.h>

#include "ktune/engine/cuda/cuda_check.h"
#endif

namespace ktune::profiler {

using nlohmann::json;

#if KTUNE_WITH_CUDA

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The part of NCCL's C API the probe calls, resolved from libnccl.so.2 (types as in nccl.h:
// results and data types are C enums, a communicator is an opaque pointer; ncclInt8 is 0).
struct Nccl {
  using Comm = void*;
  int (*comm_init_all)(Comm*, int, const int*) = nullptr;
  int (*comm_destroy)(Comm) = nullptr;
  int (*group_start)() = nullptr;
  int (*group_end)() = nullptr;
  int (*send)(const void*, size_t, int, int, Comm, cudaStream_t) = nullptr;
  int (*recv)(void*, size_t, int, int, Comm, cudaStream_t) = nullptr;
  const char* (*error_string)(int) = nullptr;
  std::string why_not;

  bool load() {
    void* h = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL);
    if (h == nullptr) h = dlopen("libnccl.so", RTLD_NOW | RTLD_GLOBAL);
    if (h == nullptr) {
      why_not = "libnccl.so.2 not found";
      return false;
    }
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
      return fn != nullptr;
    };
    if (!sym(comm_init_all, "ncclCommInitAll") || !sym(comm_destroy, "ncclCommDestroy") ||
        !sym(group_start, "ncclGroupStart") || !sym(group_end, "ncclGroupEnd") ||
        !sym(send, "ncclSend") || !sym(recv, "ncclRecv") ||
        !sym(error_string, "ncclGetErrorString")) {
      why_not = "libnccl lacks ncclSend/ncclRecv (NCCL < 2.7)";
      return false;
    }
    return true;
  }
  void check(int r, const char* what) const {
    if (r != 0) {
      throw Error(std::string("NCCL ") + what, error_string ? error_string(r) : "failed",
                  "check the GPUs with nvidia-smi topo -m, or run with NCCL_DEBUG=WARN");
    }
  }
};

struct PairResult {
  double gb_s = 0;
  double latency_us = 0;
};

// Peer copies src -> dst: `bytes` once to warm up, then `reps` times; 4 bytes `small` times.
PairResult peer_copy(int src, int dst, size_t bytes, int reps, int small) {
  PairResult r;
  KTUNE_CUDA_CHECK(cudaSetDevice(dst));
  cuda::DeviceBuffer to(bytes);
  KTUNE_CUDA_CHECK(cudaSetDevice(src));
  cuda::DeviceBuffer from(bytes);
  KTUNE_CUDA_CHECK(cudaMemset(from.data(), 1, bytes));
  cuda::Stream s;
  cuda::Event a, b;
  KTUNE_CUDA_CHECK(cudaMemcpyPeerAsync(to.data(), dst, from.data(), src, bytes, s));
  s.synchronize();
  a.record(s);
  for (int i = 0; i < reps; ++i) {
    KTUNE_CUDA_CHECK(cudaMemcpyPeerAsync(to.data(), dst, from.data(), src, bytes, s));
  }
  b.record(s);
  b.synchronize();
  r.gb_s = double(bytes) * reps / (double(b.elapsed_ms_since(a)) * 1e-3) / 1e9;
  a.record(s);
  for (int i = 0; i < small; ++i) {
    KTUNE_CUDA_CHECK(cudaMemcpyPeerAsync(to.data(), dst, from.data(), src, 4, s));
  }
  b.record(s);
  b.synchronize();
  r.latency_us = double(b.elapsed_ms_since(a)) * 1e3 / small;
  return r;
}

// NCCL send/recv src -> dst over a two-rank communicator of the pair (rank 0 = src).
PairResult nccl_pair(const Nccl& nc, int src, int dst, size_t bytes, int reps, int small) {
  PairResult r;
  Nccl::Comm comms[2] = {nullptr, nullptr};
  const int devs[2] = {src, dst};
  nc.check(nc.comm_init_all(comms, 2, devs), "ncclCommInitAll");
  struct Guard {
    const Nccl& nc;
    Nccl::Comm* c;
    ~Guard() {
      for (int i = 0; i < 2; ++i) {
        if (c[i] != nullptr) nc.comm_destroy(c[i]);
      }
    }
  } guard{nc, comms};
  KTUNE_CUDA_CHECK(cudaSetDevice(src));
  cuda::DeviceBuffer from(bytes);
  cuda::Stream ss;
  KTUNE_CUDA_CHECK(cudaSetDevice(dst));
  cuda::DeviceBuffer to(bytes);
  cuda::Stream sd;
  auto round = [&](size_t n, int times) {
    for (int i = 0; i < times; ++i) {
      nc.check(nc.group_start(), "ncclGroupStart");
      nc.check(nc.send(from.data(), n, 0, 1, comms[0], ss), "ncclSend");
      nc.check(nc.recv(to.data(), n, 0, 0, comms[1], sd), "ncclRecv");
      nc.check(nc.group_end(), "ncclGroupEnd");
    }
    KTUNE_CUDA_CHECK(cudaSetDevice(src));
    ss.synchronize();
    KTUNE_CUDA_CHECK(cudaSetDevice(dst));
    sd.synchronize();
  };
  round(bytes, 1);  // warm-up: connection setup
  double t0 = now_s();
  round(bytes, reps);
  r.gb_s = double(bytes) * reps / (now_s() - t0) / 1e9;
  round(4, 5);
  t0 = now_s();
  round(4, small);
  r.latency_us = (now_s() - t0) * 1e6 / small;
  return r;
}

}  // namespace

void measure_interconnect(const HardwareOptions& o, profile::ProfileSummary& s, json* raw) {
  const int n = static_cast<int>(s.gpus.size());
  if (n < 2) return;
  // NVLink SHARP multicast is off on ktune's machines (design: KINDS); respect a user's choice.
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  const size_t bytes = o.quick ? (size_t{16} << 20) : (size_t{256} << 20);
  const int reps = o.quick ? 2 : 10, small = o.quick ? 20 : 200;
  Nccl nc;
  const bool have_nccl = nc.load();
  json links = json::array();
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      if (i == j) continue;
      profile::GpuLink l;
      l.src = s.gpus[size_t(i)].device;
      l.dst = s.gpus[size_t(j)].device;
      int can = 0;
      KTUNE_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, i, j));
      l.peer_access = can != 0;
      if (l.peer_access) {
        KTUNE_CUDA_CHECK(cudaSetDevice(i));
        const cudaError_t e = cudaDeviceEnablePeerAccess(j, 0);
        if (e == cudaErrorPeerAccessAlreadyEnabled) {
          cudaGetLastError();
        } else {
          KTUNE_CUDA_CHECK(e);
        }
      }
      const PairResult p = peer_copy(i, j, bytes, reps, small);
      l.peer_gb_s = p.gb_s;
      l.peer_latency_us = p.latency_us;
      json jl = {{"src", l.src},
                 {"dst", l.dst},
                 {"peer_access", l.peer_access},
                 {"peer_gb_s", l.peer_gb_s},
                 {"peer_latency_us", l.peer_latency_us}};
      if (have_nccl) {
        try {
          const PairResult q = nccl_pair(nc, i, j, bytes, reps, small);
          l.nccl_gb_s = q.gb_s;
          l.nccl_latency_us = q.latency_us;
          jl["nccl_gb_s"] = q.gb_s;
          jl["nccl_latency_us"] = q.latency_us;
        } catch (const Error& e) {
          jl["nccl_error"] = e.what();  // the profiler degrades: peer copies still stand
        }
      }
      s.interconnect.push_back(l);
      links.push_back(jl);
    }
  }
  cudaSetDevice(0);
  if (raw != nullptr) {
    (*raw)["interconnect"] = links;
    (*raw)["interconnect_nccl"] = have_nccl ? std::string("libnccl loaded") : nc.why_not;
    (*raw)["interconnect_bytes"] = bytes;
  }
}

#else

void measure_interconnect(const HardwareOptions&, profile::ProfileSummary&, json*) {}

#endif

}  // namespace ktune::profiler
