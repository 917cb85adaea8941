#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz into build-fuzz (clang, ASan + UBSan, KTUNE_CUDA=OFF)
# and runs each for SECONDS (default 30), two at a time on machines with 2+ cores.
#
#   tools/fuzz.sh                  # 30 s per target
#   tools/fuzz.sh 600              # longer run on demand
#   tools/fuzz.sh 60 fuzz_gguf     # some targets only
#   tools/fuzz.sh --seeds          # rewrite the binary seeds of tests/fuzz/corpus and exit
#
# Contract (docs/fuzzing.md): every input parses or throws ktune::Error. A crash, sanitizer
# report, other exception, hang (> 2 s per input) or > 2 GB RSS is a finding: the input lands in
# build-fuzz/findings/<target>/ and the script exits 1. The committed seeds in
# tests/fuzz/corpus/<target> are only read; new inputs go to build-fuzz/corpus/<target>, which
# persists between runs. KTUNE_FUZZ_BUILD_DIR overrides the folder, KTUNE_FUZZ_JOBS the number of
# targets run at once.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KTUNE_FUZZ_BUILD_DIR:-$root/build-fuzz}"
all_targets=(fuzz_gguf fuzz_safetensors fuzz_hf_config fuzz_placement fuzz_profile)

seeds_only=0
seconds=30
targets=()
for a in "$@"; do
  case "$a" in
    --seeds) seeds_only=1 ;;
    ''|*[!0-9]*)
      if [[ " ${all_targets[*]} " == *" $a "* ]]; then
        targets+=("$a")
      else
        echo "ktune: error: tools/fuzz.sh: unknown argument '$a'; pass SECONDS, --seeds and" \
             "target names (${all_targets[*]})" >&2
        exit 2
      fi ;;
    *) seconds="$a" ;;
  esac
done
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")

max_len() {
  case "$1" in
    fuzz_gguf) echo 16384 ;;  # the compact model seeds are ~6 KB
    fuzz_profile) echo 8192 ;;
    *) echo 4096 ;;
  esac
}
dict() {
  case "$1" in
    fuzz_gguf) echo gguf.dict ;;
    fuzz_safetensors) echo safetensors.dict ;;
    fuzz_hf_config) echo hf_config.dict ;;
    fuzz_placement) echo placement.dict ;;
    fuzz_profile) echo profile.dict ;;
  esac
}

# --- build ----------------------------------------------------------------------------------
bash "$root/tools/install_deps.sh" --fuzz
gen=()
command -v ninja >/dev/null 2>&1 && [ ! -f "$build/Makefile" ] && gen=(-G Ninja)
CC=clang CXX=clang++ cmake -S "$root" -B "$build" "${gen[@]}" -DKTUNE_FUZZ=ON -DKTUNE_CUDA=OFF \
  -DKTUNE_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKTUNE_BENCHMARKS=OFF \
  >/dev/null
cmake --build "$build" --target ktune_fuzz -j "$(nproc)"

if [ "$seeds_only" = 1 ]; then
  "$build/tests/fuzz/ktune_fuzz_seeds" "$root/tests/fuzz/corpus"
  du -sh "$root/tests/fuzz/corpus"
  exit 0
fi

# --- run ------------------------------------------------------------------------------------
jobs="${KTUNE_FUZZ_JOBS:-$(nproc)}"
[ "$jobs" -gt 2 ] && jobs=2
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

run_one() {
  local t="$1"
  local work="$build/corpus/$t" findings="$build/findings/$t" log="$build/logs/$t.log"
  mkdir -p "$work" "$findings" "$build/logs"
  rm -f "$findings"/*  # findings of earlier runs: their inputs are reproduced by hand or fixed
  local before
  before=$(find "$work" -type f | wc -l)
  set +e
  "$build/tests/fuzz/$t" "$work" "$root/tests/fuzz/corpus/$t" \
    -max_total_time="$seconds" -max_len="$(max_len "$t")" -timeout=2 -rss_limit_mb=2048 \
    -malloc_limit_mb=2048 -dict="$root/tests/fuzz/$(dict "$t")" \
    -artifact_prefix="$findings/" -print_final_stats=1 >"$log" 2>&1
  local rc=$?
  set -e
  local after
  after=$(find "$work" -type f | wc -l)
  echo "$rc $before $after" >"$build/logs/$t.result"
}

start=$(date +%s)
pids=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!)
  if [ ${#pids[@]} -ge "$jobs" ]; then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p"; done

status=0
printf '%-18s %12s %10s %8s  %s\n' target execs exec/s crashes "corpus (seeds + found)"
for t in "${targets[@]}"; do
  read -r rc before after <"$build/logs/$t.result"
  log="$build/logs/$t.log"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  seeds=$(find "$root/tests/fuzz/corpus/$t" -type f | wc -l)
  crashes=$(find "$build/findings/$t" -type f | wc -l)
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes="rc=$rc"; fi
  printf '%-18s %12s %10s %8s  %s seeds, %s -> %s found\n' "$t" "${execs:-?}" "${speed:-?}" \
    "$crashes" "$seeds" "$before" "$after"
  if [ "$rc" -ne 0 ] || [ "$crashes" != 0 ]; then
    status=1
    echo "---- $t: finding (log $log, inputs in $build/findings/$t) ----"
    grep -m1 -A25 -E 'ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)|runtime error:|terminate called|==[0-9]+== ?ERROR|Test unit written' \
      "$log" || tail -30 "$log"
  fi
done
echo "fuzzing: ${#targets[@]} targets x ${seconds} s in $(( $(date +%s) - start )) s"
if [ "$status" -ne 0 ]; then
  echo "ktune: error: fuzzing found a problem; reproduce with $build/tests/fuzz/<target> <input>" >&2
fi
exit "$status"
