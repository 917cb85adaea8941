#!/usr/bin/env bash
# What a session runs on the GPU machine in one call: a full build (ninja, all cores), all tests
# (the GPU ones included), then the CPU benchmarks on the real model shape. Logs go to $OUT (or
# ./gpu-check-out) so they come back from the device tool.
#   tools/gpu_machine_check.sh [build|test|bench]...   (default: build test bench)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/gpu-check-out}"
mkdir -p "$out"
build="$root/build-gpu"
export NCCL_NVLS_ENABLE=0
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench)
for step in "${steps[@]}"; do
  case "$step" in
    build)
      start=$(date +%s)
      cmake -S "$root" -B "$build" -G Ninja -DKTUNE_WERROR=ON >"$out/configure.log" 2>&1 &&
        cmake --build "$build" -j "$(nproc)" >"$out/build.log" 2>&1
      rc=$?
      echo "build: rc=$rc in $(( $(date +%s) - start )) s"
      [ $rc -eq 0 ] || { tail -40 "$out/build.log"; exit $rc; }
      ;;
    test)
      ctest --test-dir "$build" -j 8 --output-on-failure >"$out/ctest.log" 2>&1
      echo "ctest: rc=$?"; tail -15 "$out/ctest.log"
      ;;
    bench)
      "$build/bin/ktune" info
      "$build/bin/ktune" probe --threads 1,8,16 | tee "$out/probe.txt"
      "$build/bin/ktune" run --model synth:qwen3-30b-a3b:q4_0 -p 512 -n 128 -r 3 --threads 16 \
        --json >"$out/run_q30b_q4_0.json" 2>"$out/run_q30b_q4_0.err"
      echo "run rc=$?"; tail -3 "$out/run_q30b_q4_0.err"
      python3 - "$out/run_q30b_q4_0.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{d['model']} {d['quant']} threads {d['threads']} commit {d['commit']} cpu {d['cpu']}")
print(f"pp{d['prompt_tokens']}: {d['prefill_tok_s']['mean']:.1f} ± {d['prefill_tok_s']['stddev']:.1f} tok/s")
print(f"tg{d['gen_tokens']}: {d['decode_tok_s']['mean']:.2f} ± {d['decode_tok_s']['stddev']:.2f} tok/s; "
      f"limit {d['memory_bound_decode_tok_s']:.1f} tok/s at {d['dram_read_gb_s']:.1f} GB/s "
      f"=> {100*d['decode_fraction_of_limit']:.1f} % of the limit")
PY
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
