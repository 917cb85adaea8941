#!/usr/bin/env bash
# Quick start: installs what is missing, builds, and runs the main job on the embedded default
# model (a tiny synthetic MoE generated on the fly; no download): a profile of the engine with
# its terminal report and verdict, written to quickstart-out/ (profile.json, an HTML report, a
# Chrome trace), then the placement search on that profile when this build has it.
#   bash tools/quickstart.sh [extra ktune profile flags, e.g. --model synth:qwen3-30b-a3b:q4_0]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/build.sh"
build="${KTUNE_BUILD_DIR:-$root/build}"
out="${KTUNE_QUICKSTART_OUT:-$root/quickstart-out}"
mkdir -p "$out"
ktune="$build/bin/ktune"
"$ktune" info
echo
model="${KTUNE_MODEL:-synth:tiny}"
"$ktune" profile --model "$model" -p 32 -n 64 -o "$out/profile.json" \
  --report "$out/report.html" --trace "$out/trace.json" "$@"
echo
echo "profile: $out/profile.json | report: $out/report.html (open in a browser) | trace:" \
  "$out/trace.json (Perfetto, chrome://tracing)"
if "$ktune" search --help >/dev/null 2>&1; then
  echo
  "$ktune" search --profile "$out/profile.json" --model "$model" -o "$out/best.yaml"
fi
