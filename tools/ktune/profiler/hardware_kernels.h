// The profiler's own measurement kernels (hardware_kernels.cu), for `ktune profile --hardware`.
// Only compiled with the CUDA backend. Launchers return the launch status, allocate nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ktune::profiler::gpu {

// Reads n 16-byte words once (grid-stride), folds them into *sink so nothing is optimized away.
cudaError_t launch_read_probe(const void* data, size_t bytes, uint32_t* sink, cudaStream_t s);
// A kernel that does nothing (launch, graph-node and sync overheads).
cudaError_t launch_empty(cudaStream_t s);
// One GPU thread ping-pongs with a host thread through mapped pinned memory: for i = 1..iters it
// writes *to_host = i, then spins until *from_host == i. *status = iters on success, -i when the
// host did not answer round i within timeout_ns (the GPU never hangs on a stalled host).
cudaError_t launch_flag_pingpong(volatile uint32_t* to_host, volatile const uint32_t* from_host,
                                 int iters, uint64_t timeout_ns, int* status, cudaStream_t s);

}  // namespace ktune::profiler::gpu
