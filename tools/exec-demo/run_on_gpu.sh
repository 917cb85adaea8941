#!/usr/bin/env bash
# The GPU-machine check of `ktune profile --exec` (docs/exec.md): the GPU tests with a known launch
# pattern, then the PyTorch MoE demo four ways, each run untraced, traced at level light and at
# level full: a table of steps/s and tracing overhead per level, the metrics table for
# docs/exec.md (from the light profiles) and a compare.
#   bash tools/exec-demo/run_on_gpu.sh [BUILD_DIR=/tmp/b] [OUT_DIR=/tmp/exec-demo]
# STEPS (default 400) sets the measured steps per run; SKIP_TESTS=1 skips the test binaries.
set -euo pipefail
B=${1:-/tmp/b}
D=${2:-/tmp/exec-demo}
STEPS=${STEPS:-400}
S=tools/exec-demo/moe_torch.py
K=$B/bin/ktune
export NCCL_NVLS_ENABLE=0
mkdir -p "$D"
: > "$D/rates.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
git log -1 --format='commit %h' 2>/dev/null || true
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  "$B/tests/ktune_gpu_tests" --gtest_filter='ExecProfileGpu.*' || echo "EXEC GPU TESTS FAILED"
  "$B/tests/ktune_tests" --gtest_filter='Exec*:Compare*:TraceLevel*' | tail -3 ||
    echo "EXEC UNIT TESTS FAILED"
fi
python3 "$S" --mode fused --check --steps 5

# The script's own steps/s (perf_counter around its measured loop, the same code in all three
# runs): the line "moe_torch: mode M (...): N steps in X ms, R steps/s, ...".
rate() { { grep '^moe_torch: mode' | sed -n 's/.*ms, \([0-9.]*\) steps\/s,.*/\1/p' | tail -1; } || true; }

for m in unfused unfused-graph fused fused-graph; do
  echo "== $m untraced"
  u=$({ python3 "$S" --mode "$m" --steps "$STEPS" 2>/dev/null || true; } | tee /dev/stderr | rate)
  echo "$m untraced ${u:-0}" >> "$D/rates.txt"
  for lv in light full; do
    echo "== $m traced, level $lv"
    q=-q
    [ "$m" = unfused ] && [ "$lv" = light ] && q=  # one full report, for the docs
    out=$("$K" profile --exec --trace-level "$lv" $q -o "$D/$m.$lv.json" \
            --trace "$D/$m.$lv.trace.json" -- python3 "$S" --mode "$m" --steps "$STEPS" 2>&1) ||
      echo "PROFILE FAILED: $m $lv"
    echo "$out" | grep -v '^moe_torch: .*capture' || true
    r=$(echo "$out" | rate)
    echo "$m $lv ${r:-0}" >> "$D/rates.txt"
  done
done

python3 - "$D" <<'PY'
import json, sys
d = sys.argv[1]
rates = {}
for line in open(f"{d}/rates.txt"):
    m, level, r = line.split()
    rates[(m, level)] = float(r)
modes = ["unfused", "unfused-graph", "fused", "fused-graph"]
print("\ntracing overhead (the script's own steps/s; overhead = 1 - traced / untraced):")
print("| mode | untraced steps/s | light steps/s | light overhead % | full steps/s "
      "| full overhead % |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for m in modes:
    u = rates.get((m, "untraced"), 0)
    cells = []
    for lv in ["light", "full"]:
        t = rates.get((m, lv), 0)
        cells += [f"{t:.1f}", f"{100 * (1 - t / u):.1f}" if u > 0 and t > 0 else "-"]
    print(f"| {m} | {u:.1f} | " + " | ".join(cells) + " |")

print("\nmetrics (profiles at level light; full in parentheses where it differs by > 10 %):")
print("| mode | steps/s | µs/step | GPU idle % | kernels/step | launches/step | median gap µs "
      "| launch latency µs | moe_gpu µs/step |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
def row(p):
    w = p["windows"].get("steps") or p["windows"]["run"]
    g = max(w["gpus"], key=lambda x: x["busy_us"])
    n = max(w["tokens"], 1)
    return [w["tok_s"], w["wall_us"] / n, 100 * g["idle_fraction"], g["kernels_per_token"],
            g["launches_per_token"], g["gaps"]["median_us"], g["launch_latency"]["median_us"],
            g["phases"].get("moe_gpu", {}).get("wall_us", 0) / n]
for m in modes:
    try:
        a = json.load(open(f"{d}/{m}.light.json"))
        b = json.load(open(f"{d}/{m}.full.json"))
    except (OSError, ValueError) as e:
        print(f"| {m} | (no profile: {e}) |")
        continue
    ra, rb = row(a), row(b)
    fmt = ["{:.1f}", "{:.1f}", "{:.1f}", "{:.1f}", "{:.1f}", "{:.2f}", "{:.2f}", "{:.1f}"]
    cells = []
    for f, x, y in zip(fmt, ra, rb):
        c = f.format(x)
        if max(abs(x), abs(y)) > 0 and abs(x - y) > 0.1 * max(abs(x), abs(y)):
            c += " (" + f.format(y) + ")"
        cells.append(c)
    print(f"| {m} | " + " | ".join(cells) + " |")
    print("   level:", a["exec"].get("trace_level"), "/", b["exec"].get("trace_level"),
          "; verdict:", a["verdict"]["headline"])
PY
"$K" compare "$D/unfused.light.json" "$D/fused-graph.light.json"
"$K" compare "$D/fused.light.json" "$D/fused-graph.light.json" | tail -8
