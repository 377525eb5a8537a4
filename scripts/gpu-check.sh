#!/usr/bin/env bash
# Boots the runtime with the CUDA execution provider on the demo model (and, if given, a real model
# directory), then prints the provider each ONNX session got, the boot phase times and one predict
# latency. Run it on any CUDA machine; paste its output into issue notes.
#
#   scripts/gpu-check.sh [MODEL_DIR] [--ep cuda|auto|cpu] [--size 512] [--steps 20] [--starts N] [--no-demo]
#
# --starts N boots each model N times on one cache folder, waiting after each start for the optimized-model
# cache writer, so start 2 shows what a cache hit costs (set ORT_OPTIMIZED_CACHE=always for a local MODEL_DIR: the
# copies, *.opt.onnx and their weights, are then written into that folder).
# On a machine whose CUDA libraries come from NVIDIA's Python wheels (no system CUDA), the loader
# path is assembled from site-packages nvidia/*/lib automatically (see README "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=""
EP=cuda
SIZE=512
STEPS=20
STARTS=1
DEMO=1
while [ $# -gt 0 ]; do
  case "$1" in
    --ep) EP="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --starts) STARTS="$2"; shift 2 ;;
    --no-demo) DEMO=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) MODEL_DIR="$1"; shift ;;
  esac
done

NODE=${NODE:-node}
[ -f dist/src/main.js ] || { echo "gpu-check: dist/src/main.js is missing; run npm run build (or npm ci) first" >&2; exit 2; }

. scripts/cuda-wheel-libs.sh
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
echo "onnxruntime-node: $($NODE -p "require('onnxruntime-node/package.json').version")"
ls node_modules/onnxruntime-node/bin/napi-v6/linux/x64/ 2>/dev/null | tr '\n' ' '; echo

check() {
  local label="$1" uri="$2"
  local cache; cache=$(mktemp -d)
  for n in $(seq 1 "$STARTS"); do
    start_once "$label" "$uri" "$cache" "$n"
  done
  rm -rf "$cache"
}

start_once() {
  local label="$1" uri="$2" cache="$3" n="$4"
  local log; log=$(mktemp)
  local port=$((20000 + RANDOM % 20000))
  echo "== $label (EXECUTION_PROVIDER=$EP, start $n of $STARTS)"
  local t0; t0=$(date +%s%N)
  env ${uri:+STORAGE_URI="$uri"} PORT="$port" HOST=127.0.0.1 MODEL_CACHE_DIR="$cache" EXECUTION_PROVIDER="$EP" LOG_LEVEL=info \
    "$NODE" dist/src/main.js >"$log" 2>&1 &
  local pid=$!
  local ok=0
  for _ in $(seq 1 1200); do
    if grep -q '"msg":"model ready"' "$log"; then ok=1; break; fi
    if grep -q '"msg":"boot failed' "$log" || ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  local t1; t1=$(date +%s%N)
  if [ "$ok" = 1 ]; then
    echo "  spawn -> ready: $(( (t1 - t0) / 1000000 )) ms"
    command -v nvidia-smi >/dev/null 2>&1 && echo "  GPU memory used after ready: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"
    for i in 1 2; do
      # A new seed each time: the result cache would answer a repeated request without generating.
      local body="{\"instances\":[{\"prompt\":\"a photo of a dog\",\"num_inference_steps\":$STEPS,\"height\":$SIZE,\"width\":$SIZE,\"seed\":$i}]}"
      local r; r=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' -X POST "http://127.0.0.1:$port/v1/models/model:predict" -H 'content-type: application/json' -d "$body")
      echo "  predict #$i ${SIZE}x${SIZE}/${STEPS} steps: HTTP ${r% *}, ${r#* } s"
    done
    curl -s "http://127.0.0.1:$port/metrics" | grep -E '^(inference_stage_seconds_sum|denoising_steps_per_second|gpu_)' | sed 's/^/  /' || true
    if [ "$n" -lt "$STARTS" ] && grep -q 'writing the optimized model cache in the background' "$log"; then
      # The next start is the cache hit only once the writer has finished.
      for _ in $(seq 1 1200); do
        grep -qE '"msg":"(optimized model cache written|the optimized model cache writer)' "$log" && break
        sleep 0.1
      done
    fi
  fi
  grep -E '"msg":"(execution provider|onnx session created|boot |model ready|warm-up|optimized model|writing the optimized|could not write)' "$log" \
    | "$NODE" -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{for(const l of s.split("\n").filter(Boolean)){const j=JSON.parse(l);const {level,time,pid,hostname,name,...rest}=j;console.log("  "+JSON.stringify(rest))}})'
  [ "$ok" = 1 ] || { echo "  NOT READY; last log lines:"; tail -n 5 "$log" | sed 's/^/  /'; }
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$log"
}

if [ "$DEMO" = 1 ]; then check "demo model" ""; fi
if [ -n "$MODEL_DIR" ]; then check "$MODEL_DIR" "$MODEL_DIR"; fi
