#!/bin/bash
# Opens a trace written by `ktune profile --trace` in a real viewer: speedscope (npm package) in
# Debian's headless Chromium. Exit 0: it imported; 1: it did not; 77: skipped (the reason is
# printed) because Chromium, Node.js or the npm packages are missing and cannot be installed.
# Usage: run_viewer_test.sh <path to ktune>
set -u
ktune=${1:?usage: run_viewer_test.sh <ktune binary>}
here=$(cd "$(dirname "$0")" && pwd)
chromium=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$chromium" ]; then
  echo "SKIP: no Chromium (as root: apt-get install chromium)"; exit 77
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "SKIP: no Node.js/npm (apt-get install nodejs npm)"; exit 77
fi
if [ ! -d "$here/node_modules/speedscope" ] || [ ! -d "$here/node_modules/puppeteer-core" ]; then
  # The lock file pins the versions; npm ci installs exactly those.
  if ! (cd "$here" && timeout 300 npm ci --no-audit --no-fund >/dev/null 2>&1); then
    echo "SKIP: could not install speedscope/puppeteer-core (npm ci --prefix tests/viewer)"; exit 77
  fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! "$ktune" profile --model synth:tiny -n 8 --warmup 2 -p 4 --quick -q --baseline-windows 1 \
    --trace "$work/trace.json" -o "$work/profile.json" >"$work/profile.log" 2>&1; then
  cat "$work/profile.log"; echo "FAIL: ktune profile did not write a trace"; exit 1
fi
timeout 120 node "$here/check_speedscope.mjs" "$chromium" "$work/trace.json" "cpu (ktune)" \
  "${VIEWER_SCREENSHOT:-$work/speedscope.png}"
