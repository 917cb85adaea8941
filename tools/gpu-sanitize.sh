#!/usr/bin/env bash
# Runs the GPU tests under NVIDIA compute-sanitizer and summarises what it finds (issue 8; see
# docs/reliability.md). For the GPU machine; exits 77 (skip) where there is no GPU or no
# compute-sanitizer.
#
#   tools/gpu-sanitize.sh                       # memcheck over the kernel and engine suites
#   tools/gpu-sanitize.sh --tool racecheck --tool initcheck --tool synccheck
#   tools/gpu-sanitize.sh --filter 'CudaMoe*' --leaks
#   tools/gpu-sanitize.sh --build /tmp/b        # default: build-gpu, else build
#   tools/gpu-sanitize.sh --timeout 150         # stop each tool's run after 150 s (the summary
#                                               # then covers the tests that ran: partial)
#   --api-errors: also count CUDA API calls that return an error (off by default: ktune checks
#   every call itself, and some calls fail on purpose, e.g. a capability probe with a fallback)
#
# Each tool runs the filtered ktune_gpu_tests once (one process); its full log goes to
# $OUT/sanitize-<tool>.log (OUT defaults to ./sanitize-out). Printed per tool: the tests'
# result, compute-sanitizer's error count, the errors grouped by kind and kernel, wall time.
# Exit 0 when every tool reports 0 errors and the tests pass, 1 otherwise.
#
# Not in the default filter: the profiler's tests (ProfilerGpu, ExecProfileGpu, GpuFaults'
# CUPTI cases: compute-sanitizer is itself the process's CUPTI client, so ktune's tracer falls
# back to host spans by design), GpuFaults' memory hog (it fills the device), benchmarks, and
# the multi-GPU suites (MultiGpuEngine, GpuLink, ProfilerInterconnect: run them on a multi-GPU
# host with --filter).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$PWD/sanitize-out}"
build=""
filter='Cuda*:GpuEngine.*:GpuEngineGraph.*:GpuEngineHybrid.*:GpuPrefill.*:GpuPrefillHybrid.*:PrefillKernels.*:-CudaMatvecBench.*:GpuEngineBench.*'
tools=()
leaks=0
api_errors=no
limit=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --filter) filter="$2"; shift 2 ;;
    --tool) tools+=("$2"); shift 2 ;;
    --leaks) leaks=1; shift ;;
    --api-errors) api_errors=explicit; shift ;;
    --timeout) limit="$2"; shift 2 ;;
    -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "ktune: error: tools/gpu-sanitize.sh: unknown argument '$1'; see --help" >&2; exit 2 ;;
  esac
done
[ ${#tools[@]} -eq 0 ] && tools=(memcheck)
if [ -z "$build" ]; then
  for b in "$root/build-gpu" "$root/build"; do
    [ -x "$b/tests/ktune_gpu_tests" ] && { build="$b"; break; }
  done
fi
bin="$build/tests/ktune_gpu_tests"
if [ -z "$build" ] || [ ! -x "$bin" ]; then
  echo "ktune: error: tools/gpu-sanitize.sh: no ktune_gpu_tests in ${build:-build-gpu or build};" \
       "build it (cmake --build BUILD --target ktune_gpu_tests) and pass --build BUILD" >&2
  exit 2
fi
cs="$(command -v compute-sanitizer || true)"
if [ -z "$cs" ]; then  # beside nvcc, in CUDA_HOME, or in the usual toolkit folders
  nvcc_dir="$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")"
  for c in "$nvcc_dir/compute-sanitizer" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    [ -x "$c" ] && { cs="$c"; break; }
  done
fi
if [ -z "$cs" ]; then
  echo "skip: compute-sanitizer not found (it ships with the CUDA toolkit, bin/compute-sanitizer)"
  exit 77
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "skip: no GPU here (nvidia-smi -L failed)"
  exit 77
fi
export NCCL_NVLS_ENABLE=0
mkdir -p "$out"
echo "# compute-sanitizer: $("$cs" --version | tail -1)"
echo "# binary: $bin"
echo "# filter: $filter"

status=0
for tool in "${tools[@]}"; do
  log="$out/sanitize-$tool.log"
  extra=()
  [ "$tool" = memcheck ] && [ "$leaks" = 1 ] && extra+=(--leak-check full)
  start=$(date +%s)
  # --error-exitcode: the process fails when the tool saw an error even if every test passed.
  stopper=()
  [ "$limit" != 0 ] && stopper=(timeout --signal=TERM --kill-after=10 "$limit")
  "${stopper[@]}" "$cs" --tool "$tool" "${extra[@]}" --report-api-errors "$api_errors" --error-exitcode 86 \
    --print-limit 200 \
    --log-file "$log.tool" "$bin" --gtest_filter="$filter" --gtest_brief=1 >"$log.tests" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  cat "$log.tool" "$log.tests" >"$log" 2>/dev/null
  rm -f "$log.tool" "$log.tests"
  errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9][0-9]*\) error.*/\1/p' "$log" | tail -1)
  passed=$(sed -n 's/^\[  PASSED  \] \([0-9][0-9]*\) test.*/\1/p' "$log" | tail -1)
  failed=$(grep -c '^\[  FAILED  \] [A-Za-z]' "$log")
  skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9][0-9]*\) test.*/\1/p' "$log" | tail -1)
  [ "$rc" -eq 124 ] && echo "== $tool: stopped after $limit s (--timeout): partial"
  echo "== $tool: rc=$rc, ${errors:-?} sanitizer errors, tests: ${passed:-0} passed," \
       "${skipped:-0} skipped, $failed failed lines, ${secs} s (log $log)"
  if [ "${errors:-1}" != 0 ] || [ "$rc" -ne 0 ]; then
    status=1
    # Group by the error's first line (its kind) and the kernel or call of its "at" line.
    awk '
      /^========= [A-Z]/ && !/ERROR SUMMARY/ && !/COMPUTE-SANITIZER/ {
        kind = $0; sub(/^========= /, "", kind); sub(/ at 0x[0-9a-f]+.*/, "", kind)
        want = 1; next
      }
      want && /^=========  +at / {
        k = $0; sub(/^=========  +at /, "", k)
        if (k ~ /^0x[0-9a-f]+ in /) sub(/^0x[0-9a-f]+ in /, "", k)
        sub(/\(.*/, "", k); sub(/\+0x[0-9a-f]+.*/, "", k)
        count[kind " | " k]++; want = 0; next
      }
      want && /^=========$/ { count[kind]++; want = 0 }
      END { for (c in count) printf "  %5d  %s\n", count[c], c }
    ' "$log" | sort -rn | head -25
    grep '^\[  FAILED  \] [A-Za-z]' "$log" | head -20
  fi
done
exit $status
