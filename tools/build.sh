#!/usr/bin/env bash
# Configures and builds ktune into ${KTUNE_BUILD_DIR:-build} (Release; CUDA when nvcc is found).
# Extra arguments go to cmake's configure step, e.g. tools/build.sh -DKTUNE_CUDA=OFF
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KTUNE_BUILD_DIR:-$root/build}"
bash "$root/tools/install_deps.sh"
gen=()
command -v ninja >/dev/null 2>&1 && [ ! -f "$build/Makefile" ] && gen=(-G Ninja)
cmake -S "$root" -B "$build" "${gen[@]}" "$@" >/dev/null
cmake --build "$build" -j "$(nproc)"
