// Chrome trace export of a timeline, shaped like Kineto's output so Perfetto, chrome://tracing,
// Holistic Trace Analysis and speedscope read it (docs/profile-format.md, "trace.json"):
//   - one process per GPU (pid = device index, "cuda:N <name>"), one track per CUDA stream with
//     kernels/copies as complete events (cat kernel | gpu_memcpy | gpu_memset, args with
//     correlation, stream, device, graph node id, layer, phase), a "phases" track per stream
//     with the layer/phase of consecutive kernels, and a sync track per stream;
//   - one host process (pid kHostPid, "cpu (ktune)") with a track per thread: the engine's host
//     spans (cat user_annotation), CUDA runtime calls (cat cuda_runtime), NVTX ranges of other
//     domains, and a "windows" track for the profiled prefill/decode windows;
//   - flow arrows (ph s/f, cat and name "ac2g", id = correlation, "bp":"e") from each launch to
//     its first GPU op;
//   - metadata events (process_name, process_labels, process_sort_index, thread_name,
//     thread_sort_index) with ts; times in microseconds relative to baseTimeNanoseconds, 3
//     decimals; "distributedInfo": {"rank": 0} for HTA.
#pragma once

#include <string>

#include "profiler/analysis.h"
#include "profiler/timeline.h"

namespace ktune::profiler {

constexpr int kHostPid = 1000000;

// The trace as a JSON text (streamed, not built as a DOM: profiles hold 10^5 events).
std::string chrome_trace(const Timeline& t, const std::vector<OpTag>& tags,
                         const std::string& trace_name);
void write_chrome_trace(const std::string& path, const Timeline& t, const std::string& trace_name);

}  // namespace ktune::profiler
