// Moving activations between the GPUs of the multi-GPU layer split (ktune/engine/gpu_stages.h):
// the hidden state of one token (hidden floats, a few KB), a prefill chunk's (up to 512 x
// hidden floats) and the sampled token. One process drives every GPU from one thread; rank r
// is devices[r] with its stream streams[r] (the stage's stream).
//
// copy(from, src, to, dst, bytes) enqueues the move without any host synchronisation: it starts
// after the work already enqueued on `from`'s stream (which produced src) and on `to`'s stream
// (which may still read dst); later work on `to`'s stream sees the data, later work on `from`'s
// stream may overwrite src. Two kinds (GpuTransport):
//   nccl  ncclSend on from's communicator and stream, ncclRecv on to's, in one NCCL group (one
//         thread driving several devices must group them). Works without P2P (NCCL picks
//         shared memory through the host; NCCL_P2P_DISABLE=1 forces that).
//   peer  to's stream records "dst free", from's stream waits for it and copies
//         (cudaMemcpyPeerAsync) and records "data there", to's stream waits for that. Without
//         peer access (cudaDeviceCanAccessPeer false, or NCCL_P2P_DISABLE=1 / KTUNE_P2P_DISABLE=1)
//         the copy goes through a pinned host buffer of the pair: device-to-host on from's
//         stream, host-to-device on to's stream, ordered by the same events.
// Neither is captured in the stages' CUDA graphs: NCCL advises against graph capture when one
// thread manages several GPUs (a cudaGraphLaunch may block), so the engine issues the copies
// between the per-GPU graph launches (a few microseconds each, no host sync).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ktune/engine/placement.h"  // GpuTransport

namespace ktune::cuda {

class GpuLink {
 public:
  virtual ~GpuLink() = default;
  // See above. Leaves the calling thread's current device as it was. Throws ktune::Error.
  virtual void copy(int from, const void* src, int to, void* dst, size_t bytes) = 0;
  virtual GpuTransport kind() const = 0;
  // "nccl", "peer (P2P)", "peer (staged through host)", "peer (P2P 0->1, staged 1->0)"
  virtual std::string describe() const = 0;
};

// The pairs (from, to) that copy() will use, and the largest copy: the peer link sizes one
// pinned staging buffer per pair that has no peer access. allow_p2p = false forces staging
// (tests); NCCL_P2P_DISABLE=1 or KTUNE_P2P_DISABLE=1 in the environment does too.
std::unique_ptr<GpuLink> make_peer_link(const std::vector<int>& devices,
                                        const std::vector<cudaStream_t>& streams,
                                        const std::vector<std::pair<int, int>>& pairs,
                                        size_t max_bytes, bool allow_p2p = true);
// Communicators over `devices` (ncclCommInitAll). Throws ktune::Error in a build without NCCL.
std::unique_ptr<GpuLink> make_nccl_link(const std::vector<int>& devices,
                                        const std::vector<cudaStream_t>& streams);
bool nccl_built();  // this build links NCCL

}  // namespace ktune::cuda
