// Facts about this build, for self-describing reports.
#pragma once

namespace ktune {
const char* build_commit();   // git commit (short), "-dirty" when the tree had changes
const char* build_version();  // project version
bool build_has_cuda();        // compiled with the CUDA backend
}  // namespace ktune
