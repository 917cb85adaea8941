#!/usr/bin/env bash
# Builds ktune and runs every test: the normal build's ctest (GPU tests skip without a device),
# then the unit tests once more under AddressSanitizer + UndefinedBehaviorSanitizer in a
# CPU-only build (KTUNE_CUDA=OFF keeps it fast). Set KTUNE_SKIP_SANITIZERS=1 to skip that part.
# Last, the libFuzzer targets run 20 s each (tools/fuzz.sh; KTUNE_SKIP_FUZZ=1 skips them,
# KTUNE_FUZZ_SECONDS changes the time).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs="$(nproc)"

echo "== build (Release, warnings as errors) =="
KTUNE_BUILD_DIR="$root/build" bash "$root/tools/build.sh" -DKTUNE_WERROR=ON
echo "== tests =="
ctest --test-dir "$root/build" --output-on-failure -j "$jobs"

if [ "${KTUNE_SKIP_SANITIZERS:-0}" != "1" ]; then
  # Warnings are errors in the Release build above; GCC 12 under -fsanitize reports false
  # maybe-uninitialized warnings inside libstdc++, so this build only reports them.
  echo "== build (ASan + UBSan, KTUNE_CUDA=OFF) =="
  KTUNE_BUILD_DIR="$root/build-asan" bash "$root/tools/build.sh" -DKTUNE_CUDA=OFF \
    -DKTUNE_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=RelWithDebInfo
  echo "== tests under ASan + UBSan =="
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir "$root/build-asan" --output-on-failure -j "$jobs" -LE gpu
fi

if [ "${KTUNE_SKIP_FUZZ:-0}" != "1" ]; then
  echo "== fuzzing (libFuzzer + ASan + UBSan, ${KTUNE_FUZZ_SECONDS:-20} s per target) =="
  bash "$root/tools/fuzz.sh" "${KTUNE_FUZZ_SECONDS:-20}"
fi
