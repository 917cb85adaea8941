#!/usr/bin/env bash
# Cross-check ktune against llama.cpp: do the GGUF files `ktune gen-model` writes load in
# llama.cpp, and do both engines compute the same logits for them?
#
# NOT run in CI (it needs a llama.cpp checkout, which CI cannot download). Run it by hand:
#
#   LLAMA_CPP_DIR=/path/to/llama.cpp \
#   KTUNE=build/bin/ktune \
#   bash tests/reference/compare_with_llama_cpp.sh
#
# What it does:
#   1. builds llama.cpp's `llama` library, CPU only, static (skipped when LLAMA_BUILD_DIR
#      already holds libllama.a / libllama.so);
#   2. compiles tests/reference/llama_logits.cpp (uses only llama.h's public API) against it;
#   3. for each quant in QUANTS: `ktune gen-model --preset PRESET --quant Q --seed SEED`, then
#      `ktune logits --json` and llama.cpp (via llama_logits) on the same tokens, and prints
#      max|diff| / max|logit| per position, plus both argmaxes.
#
# Environment (all optional except LLAMA_CPP_DIR):
#   LLAMA_CPP_DIR    llama.cpp source checkout (required)
#   KTUNE            ktune binary                   (default: build/bin/ktune of this repo)
#   WORK_DIR         scratch folder                 (default: /tmp/ktune-llama-compare)
#   LLAMA_BUILD_DIR  llama.cpp build folder         (default: $WORK_DIR/llama-build)
#   QUANTS           quant types to try             (default: "f32 f16 bf16 q8_0 q4_0")
#   PRESET, SEED     model to generate              (default: tiny, 1)
#   TOKENS           prefill token ids              (default: 5,77,300)
#   THEN             teacher-forced decode tokens   (default: 17,230; empty for none)
#   THREADS          threads for both engines       (default: 2)
#   JOBS             build parallelism              (default: 2)
#   CXX              C++ compiler                   (default: c++)
#   TOL_F32          pass/fail bound on rel. diff for f32 (default: 1e-3); other quants are
#                    reported only, since the engines round activations differently.
#
# Exit status: 0 when every model loaded and f32 agreed within TOL_F32, 1 otherwise.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

: "${LLAMA_CPP_DIR:?set LLAMA_CPP_DIR to a llama.cpp checkout}"
LLAMA_CPP_DIR="$(cd "$LLAMA_CPP_DIR" && pwd)"
KTUNE="${KTUNE:-$repo/build/bin/ktune}"
WORK_DIR="${WORK_DIR:-/tmp/ktune-llama-compare}"
LLAMA_BUILD_DIR="${LLAMA_BUILD_DIR:-$WORK_DIR/llama-build}"
QUANTS="${QUANTS:-f32 f16 bf16 q8_0 q4_0}"
PRESET="${PRESET:-tiny}"
SEED="${SEED:-1}"
TOKENS="${TOKENS:-5,77,300}"
THEN="${THEN-17,230}"
THREADS="${THREADS:-2}"
JOBS="${JOBS:-2}"
CXX="${CXX:-c++}"
TOL_F32="${TOL_F32:-1e-3}"

[[ -x "$KTUNE" ]] || { echo "ktune binary not found: $KTUNE (set KTUNE)" >&2; exit 2; }
[[ -f "$LLAMA_CPP_DIR/include/llama.h" ]] || { echo "no include/llama.h in $LLAMA_CPP_DIR" >&2; exit 2; }
mkdir -p "$WORK_DIR"

find_lib() { find "$LLAMA_BUILD_DIR" -name "$1" -print -quit 2>/dev/null; }

# 1. llama.cpp, CPU only.
if [[ -z "$(find_lib 'libllama.a')" && -z "$(find_lib 'libllama.so')" ]]; then
  echo "== building llama.cpp (CPU, static) in $LLAMA_BUILD_DIR"
  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$LLAMA_CPP_DIR" -B "$LLAMA_BUILD_DIR" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF >"$WORK_DIR/llama-cmake.log"
  cmake --build "$LLAMA_BUILD_DIR" -j"$JOBS" --target llama >"$WORK_DIR/llama-build.log"
fi

# 2. The comparison program.
bin="$WORK_DIR/llama_logits"
echo "== compiling $bin"
if [[ -n "$(find_lib 'libllama.a')" ]]; then
  libs=()
  for l in libllama.a libggml.a libggml-cpu.a libggml-base.a; do
    p="$(find_lib "$l")"; [[ -n "$p" ]] && libs+=("$p")
  done
  "$CXX" -std=c++17 -O2 -I"$LLAMA_CPP_DIR/include" -I"$LLAMA_CPP_DIR/ggml/include" \
    "$here/llama_logits.cpp" -o "$bin" -Wl,--start-group "${libs[@]}" -Wl,--end-group \
    -lpthread -ldl -lm
else
  libdir="$(dirname "$(find_lib 'libllama.so')")"
  "$CXX" -std=c++17 -O2 -I"$LLAMA_CPP_DIR/include" -I"$LLAMA_CPP_DIR/ggml/include" \
    "$here/llama_logits.cpp" -o "$bin" -L"$libdir" -Wl,-rpath,"$libdir" -lllama -lggml -lggml-base
fi

commit="$(git -C "$LLAMA_CPP_DIR" rev-parse HEAD 2>/dev/null || echo unknown)"
echo "llama.cpp: $LLAMA_CPP_DIR @ $commit"
echo "ktune:     $KTUNE ($("$KTUNE" --version 2>/dev/null | head -1 || true))"
echo "model:     preset=$PRESET seed=$SEED  tokens=$TOKENS  then=${THEN:-none}"

# 3. Models and logits.
status=0
summary=()
for q in $QUANTS; do
  model="$WORK_DIR/$PRESET-$q.gguf"
  echo
  echo "== $q"
  "$KTUNE" gen-model --preset "$PRESET" --quant "$q" --seed "$SEED" -o "$model" -q
  then_args=(); [[ -n "$THEN" ]] && then_args=(--then "$THEN")
  "$KTUNE" logits --model "$model" --tokens "$TOKENS" "${then_args[@]}" --threads "$THREADS" \
    --json >"$WORK_DIR/ktune-$q.json"
  log="$WORK_DIR/llama-$q.log"
  set +e
  "$bin" "$model" "$TOKENS" "${then_args[@]}" --threads "$THREADS" \
    --compare "$WORK_DIR/ktune-$q.json" >"$WORK_DIR/compare-$q.txt" 2>"$log"
  rc=$?
  set -e
  if [[ $rc -ge 2 ]]; then
    echo "llama.cpp did not load or run $model (exit $rc); last lines of $log:"
    tail -n 15 "$log"
    summary+=("$(printf '%-6s  %-8s  %s' "$q" "FAILED" "see $log")")
    status=1
    continue
  fi
  cat "$WORK_DIR/compare-$q.txt"
  warns="$(grep -ciE 'warn|error' "$log" || true)"
  echo "llama.cpp log: $log ($warns warning/error lines):"
  grep -iE 'warn|error' "$log" | sed 's/^/  /' | head -n 10 || true
  worst="$(sed -n 's/^worst rel = //p' "$WORK_DIR/compare-$q.txt")"
  tops="$(awk '$1=="prefill"||$1=="decode"{n++; if($6==$7) m++} END{print m "/" n}' \
    "$WORK_DIR/compare-$q.txt")"
  verdict="loaded"
  if [[ "$q" == "f32" ]] && ! awk -v w="$worst" -v t="$TOL_F32" 'BEGIN{exit !(w<=t)}'; then
    verdict="MISMATCH"
    status=1
  fi
  summary+=("$(printf '%-6s  %-8s  worst rel %-11s  argmax agree %s' "$q" "$verdict" "$worst" "$tops")")
done

echo
echo "== summary (rel = max|llama.cpp - ktune| / max|ktune logit|, per position, worst shown)"
printf '%s\n' "${summary[@]}"
exit $status
