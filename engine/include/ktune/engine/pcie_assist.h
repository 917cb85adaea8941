// The PCIe assist's split of a token's CPU experts (RuntimeOptions::pcie_assist_permille): the
// one rule the GPU kernel that picks the GPU's share (hybrid_kernels.h, launch_pcie_assist_map),
// the CPU driver that skips them and the search's cost model all use.
#pragma once

#ifdef __CUDACC__
#define KTUNE_HOST_DEVICE __host__ __device__
#else
#define KTUNE_HOST_DEVICE
#endif

namespace ktune {

// Of n_cpu CPU experts a token selected in a layer, how many the GPU computes over PCIe:
// n_cpu * num / den rounded down (integers, so every side agrees). They are the last ones in
// top-k order; the CPU computes the others.
KTUNE_HOST_DEVICE inline int pcie_assist_count(int n_cpu, int num, int den) {
  return den > 0 && num > 0 ? n_cpu * num / den : 0;
}

}  // namespace ktune
