#!/usr/bin/env bash
# The GPU-machine check of `ktune profile --exec` (docs/exec.md): the GPU tests with a known launch
# pattern, then the PyTorch MoE demo profiled four ways, a table for docs/exec.md and a compare.
#   bash tools/exec-demo/run_on_gpu.sh [BUILD_DIR=/tmp/b] [OUT_DIR=/tmp/exec-demo]
set -euo pipefail
B=${1:-/tmp/b}
D=${2:-/tmp/exec-demo}
S=tools/exec-demo/moe_torch.py
K=$B/bin/ktune
export NCCL_NVLS_ENABLE=0
mkdir -p "$D"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
git log -1 --format='commit %h'
"$B/tests/ktune_gpu_tests" --gtest_filter='ExecProfileGpu.*' || echo "EXEC GPU TESTS FAILED"
"$B/tests/ktune_tests" --gtest_filter='Exec*:Compare*' | tail -3 || echo "EXEC UNIT TESTS FAILED"
python3 "$S" --mode fused --check --steps 5
for m in unfused unfused-graph fused fused-graph; do
  echo "== $m untraced"; python3 "$S" --mode "$m"
  echo "== $m traced"
  q=-q; [ "$m" = unfused ] && q=  # one full report, for the docs
  "$K" profile --exec $q -o "$D/$m.json" --trace "$D/$m.trace.json" -- python3 "$S" --mode "$m"
done
python3 - "$D" <<'PY'
import json, sys
d = sys.argv[1]
print("| mode | steps/s | µs/step | GPU idle % | kernels/step | launches/step | median gap µs "
      "| launch latency µs | moe_gpu µs/step |")
for m in ["unfused", "unfused-graph", "fused", "fused-graph"]:
    p = json.load(open(f"{d}/{m}.json"))
    w = p["windows"].get("steps") or p["windows"]["run"]
    g = max(w["gpus"], key=lambda x: x["busy_us"])
    n = max(w["tokens"], 1)
    print(f"| {m} | {w['tok_s']:.1f} | {w['wall_us']/n:.1f} | {100*g['idle_fraction']:.1f} | "
          f"{g['kernels_per_token']:.1f} | {g['launches_per_token']:.1f} | "
          f"{g['gaps']['median_us']:.2f} | {g['launch_latency']['median_us']:.2f} | "
          f"{g['phases'].get('moe_gpu', {}).get('wall_us', 0)/n:.1f} |")
    print("   verdict:", p["verdict"]["headline"])
PY
"$K" compare "$D/unfused.json" "$D/fused-graph.json"
"$K" compare "$D/fused.json" "$D/fused-graph.json" | tail -8
