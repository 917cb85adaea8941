#!/usr/bin/env bash
# Quick start: installs what is missing, builds, and runs the main job on the embedded default
# model (a tiny synthetic MoE generated on the fly; no download). Prints a report.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/build.sh"
build="${KTUNE_BUILD_DIR:-$root/build}"
"$build/bin/ktune" info
echo
"$build/bin/ktune" run --model "${KTUNE_MODEL:-synth:tiny}" -p 128 -n 64 -r 3 "$@"
