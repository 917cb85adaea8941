#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages ktune builds with, if any are missing (--fuzz: also those
# of the fuzz build).
# As root: apt-get installs them. Otherwise: prints the exact apt line and exits 1.
set -euo pipefail

packages=(g++ cmake ninja-build pkg-config git libcli11-dev libyaml-cpp-dev libfmt-dev
          nlohmann-json3-dev libgtest-dev libgmock-dev libbenchmark-dev)
# tools/fuzz.sh passes --fuzz: clang and its runtime libraries (libFuzzer, ASan, UBSan).
[ "${1:-}" = "--fuzz" ] && packages+=(clang libclang-rt-dev)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ktune: error: packages: missing ${missing[*]}; install them with your package manager" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ktune: error: packages: missing ${missing[*]}; run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "ktune: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
