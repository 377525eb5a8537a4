#!/usr/bin/env bash
# Runs every benchmark once in its shortest form (`npm run bench:smoke`, after `npx tsc -p tsconfig.build.json`):
# tiny sizes, one repetition, baselines side by side where a bench has one (this build against itself). A check
# that each still starts, prints its table and exits 0, not a measurement: the test suite runs none of them, and a
# device session has no minutes to lose to a broken one. ~4 minutes on 2 cores; prints one line per bench.
#
#   scripts/bench-smoke.sh [NAME...]        (names as in the list below; default all)
#
# BENCH_GPU_WORK=DIR adds bench-gpu on the CPU (BENCH_GPU_QUICK=1 BENCH_GPU_EP=cpu) over DIR, a tiny export made by
# `SD15_TINY=1 SD15_DEVICE=cpu scripts/gpu_sd15.py` (docs/BENCHMARKS.md, "Checking the GPU scripts without a GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f dist/scripts/bench-common.js ] || { echo "bench-smoke: dist/ is missing; run npx tsc -p tsconfig.build.json" >&2; exit 2; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
node -e "import('./dist/src/demo/build.js').then((m) => m.buildDemoModel('$TMP/demo', { padBytes: 8 << 20, padSplit: 'unet' }))" || exit 2
S=dist/scripts
# name|environment|arguments (node $S/bench-<script>.js); the first word of the name is the script.
BENCHES=(
  "hash|BENCH_MB=32 BENCH_REPEAT=1|"
  "cache-key|BENCH_N=50|"
  "tokenizer|BENCH_N=10|"
  "text-fix|BENCH_N=20|."
  "decode|BENCH_N=1|"
  "decode-memory|BENCH_SIDES=256|"
  "scheduler|BENCH_UNET_MS=2|euler dpmpp_sde_karras"
  "session|BENCH_REPS=1 BENCH_STEPS=2|"
  "bare-boot|WARMUP_STEPS=1|$TMP/demo --opt-cache"
  "modes|BENCH_RUNS=1 BENCH_SIZE=64 BENCH_STEPS=2|"
  "serve|BENCH_RUNS=2 BENCH_SIZE=64 BENCH_STEPS=2 BENCH_DURATION_S=1 BENCH_BATCH_IMAGES=8 BENCH_BATCH_SIZE_PX=64|"
  "lora||16 2"
  "adapter-fetch|BENCH_MB=8 BENCH_RUNS=1 BENCH_POOLS=16,4 BENCH_WRITES=auto,2,off|"
  "lora switch|BENCH_LORA_BASELINE=dist BENCH_LORA_ROUNDS=1 BENCH_LORA_REQUESTS=3 BENCH_LORA_IDLE_S=1|switch"
  "realsize serve|STORAGE_URI= MODEL_CACHE_DIR=$TMP/rs-cache BENCH_SIZE=64 BENCH_STEPS=2 BENCH_LORA=demo-style|serve"
  "realsize merge||merge $TMP/demo $TMP/demo/loras/demo-style.safetensors ."
  "s3|BENCH_MB=20 BENCH_TTFBS=40 BENCH_REPEAT=1 BENCH_CLIENTS=ceiling,naive,warmup,warmup-unchecked|"
  "cold-start|BENCH_REPS=1 BENCH_PAD_BYTES=20e6|"
  "cold-start hits|BENCH_REPS=1 BENCH_PAD_BYTES=20e6 BENCH_HIT_BUILDS=.,.#AUX_THREADS=on|"
  "burst|BENCH_REPS=1 BENCH_BURST_N=2 BENCH_PAD_BYTES=20e6 BENCH_BURST_BUILDS=.,.|"
  "connections|BENCH_IDLE=20 BENCH_TRICKLE=5 BENCH_WS=5 BENCH_PROBES=3 BENCH_WAIT_CLOSE=0 BENCH_NOFILE=256|"
  "faults|BENCH_BASELINE=1 BENCH_WARMUPS=1 BENCH_BOOTS=1 BENCH_KILLS=1 BENCH_TERMS=1 BENCH_PAD_BYTES=20e6 BENCH_SEED=7|"
  "held|BENCH_MB=8 BENCH_RUNS=1|"
  "soak|BENCH_SOAK_RUNS=mixed BENCH_SOAK_REQUESTS=60 BENCH_SOAK_SAMPLE_EVERY=20 BENCH_SEED=3|"
)
[ -n "${BENCH_GPU_WORK:-}" ] && BENCHES+=("gpu|BENCH_GPU_QUICK=1 BENCH_GPU_EP=cpu|$BENCH_GPU_WORK --out $TMP/bench-gpu.json")
failed=0
for b in "${BENCHES[@]}"; do
  IFS='|' read -r name envs args <<<"$b"
  script=${name%% *}
  if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qxF -e "$name" -e "$script"; then continue; fi
  log="$TMP/${name// /-}.log"
  t0=$(date +%s)
  # shellcheck disable=SC2086 # the environment and the arguments are word lists
  env $envs timeout 600 node "$S/bench-$script.js" $args >"$log" 2>&1
  rc=$?
  # Every bench ends with a table or one JSON line; a run that printed nothing to stdout's end is a failure too.
  if [ "$rc" = 0 ] && [ -s "$log" ] && ! grep -q '^!! \|^errors: \[' "$log"; then
    printf 'ok    %-16s %4d s\n' "$name" $(( $(date +%s) - t0 ))
  else
    failed=$((failed + 1))
    printf 'FAIL  %-16s %4d s (exit %s); last lines:\n' "$name" $(( $(date +%s) - t0 )) "$rc"
    tail -n 15 "$log" | sed 's/^/      /'
  fi
done
[ "$failed" = 0 ] || { echo "bench-smoke: $failed failed" >&2; exit 1; }
