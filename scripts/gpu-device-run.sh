#!/usr/bin/env bash
# Runs on the CUDA machine, after scripts/gpu-bundle.sh's pieces: the earlier ones copied to /root/stage, the last
# one in the folder given. Unpacks the payload over the working tree, then the checks whose output the closing
# notes quote: CUDA boot and predict (gpu-check.sh), parity with diffusers with TF32 off and on, the
# optimized-model cache on a 300 MB model, an fp16 export, and EXECUTION_PROVIDER=auto. BENCH=1 (bundle made
# --with-bench) runs only bench:cold-start, with BENCH_EP=cuda and then cpu. SD15=1 (bundle made --with-sd15, first
# call scripts/gpu-sd15-start.sh) runs the SD 1.5-size comparison: diffusers against the plain and the fused export.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
LAST=${1:?usage: gpu-device-run.sh LAST_PIECE_FOLDER}
mkdir -p /root/stage && cp "$LAST"/p* /root/stage/
PIECES=$(ls /root/stage/p* 2>/dev/null | sort -V)
[ -n "$PIECES" ] || { echo "gpu-device-run: no payload pieces in /root/stage" >&2; exit 3; }
t0=$(date +%s)
cat $PIECES | xz -dc | tar x || { echo "gpu-device-run: could not unpack the payload ($(echo $PIECES | wc -w) pieces; were the earlier ones copied?)" >&2; exit 3; }
echo "unpacked in $(( $(date +%s) - t0 )) s; $(ldd --version 2>&1 | head -1)"
export NODE=$PWD/gpu/node
. scripts/cuda-wheel-libs.sh
echo "CUDA provider's libraries:"
ldd node_modules/onnxruntime-node/bin/napi-v6/linux/x64/libonnxruntime_providers_cuda.so | grep -E 'not found|cublas|cudart|libcuda'
if [ "${SD15:-0}" = 1 ]; then
  # The SD 1.5-size comparison (scripts/gpu-sd15-start.sh started its Python half in the first call).
  echo "driver library: $(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 2>/dev/null | tr '\n' ' '); ld.so.cache entries: $(ldconfig -p 2>/dev/null | grep -c 'libcuda.so.1')"
  echo "#### waiting for scripts/gpu_sd15.py (build, diffusers timing, plain and fused export)"
  for _ in $(seq 1 "${SD15_WAIT_S:-420}"); do [ -f /root/sd15/python.rc ] && break; sleep 1; done
  cat /root/sd15/python.log | grep -vE 'it/s\]|^\s*$' | tail -n 60
  [ -f /root/sd15/python.rc ] || echo "gpu-device-run: gpu_sd15.py still running after ${SD15_WAIT_S:-420} s"
  cp /root/sd15/work/python.json "${OUT:-/tmp}/python.json" 2>/dev/null || true
  if [ -d gpu/cases ]; then
    echo "#### parity with diffusers on CUDA (tiny e2e reference), TF32 off"
    EXECUTION_PROVIDER=cuda $NODE dist/scripts/parity-check.js gpu/e2e-model gpu/cases
  fi
  echo "#### bench-gpu"
  ORT_NODE_VERSION=$($NODE -p "require('onnxruntime-node/package.json').version") $NODE dist/scripts/bench-gpu.js /root/sd15/work --out "${OUT:-/tmp}/bench-gpu.json"
  exit 0
fi
if [ "${BENCH:-0}" = 1 ]; then
  export THROTTLE_PROXY=$PWD/gpu/tools/throttle-proxy.mjs
  for ep in ${BENCH_EPS:-cuda cpu}; do
    echo "#### bench:cold-start, BENCH_EP=$ep, $(nproc) cores"
    BENCH_EP=$ep $NODE dist/scripts/bench-cold-start.js 2>&1 | grep -vE '^rep [0-9]'
  done
  exit 0
fi
if [ -d gpu/e2e-model ]; then bash scripts/gpu-check.sh gpu/e2e-model --ep cuda; else bash scripts/gpu-check.sh --ep cuda; fi
if [ -d gpu/cases ]; then
  echo "#### parity with diffusers on CUDA, defaults (TF32 off)"
  EXECUTION_PROVIDER=cuda $NODE dist/scripts/parity-check.js gpu/e2e-model gpu/cases
  echo "#### parity with diffusers on CUDA, CUDA_TF32=true"
  CUDA_TF32=true EXECUTION_PROVIDER=cuda $NODE dist/scripts/parity-check.js gpu/e2e-model gpu/cases
  for t in false true; do
    echo "#### e2e model, CUDA_TF32=$t"
    CUDA_TF32=$t bash scripts/gpu-check.sh gpu/e2e-model --ep cuda --no-demo | grep -E 'predict|denoising_steps|cuda started|spawn'
  done
fi
echo "#### 300 MB model (sd15 split): optimized-model cache always (3 starts), then off (2 starts)"
$NODE dist/src/demo/cli.js /root/pad --pad-mb 300 >/dev/null
ORT_OPTIMIZED_CACHE=always bash scripts/gpu-check.sh /root/pad --ep cuda --no-demo --starts 3 | grep -E '==|spawn|session created|predict'
ORT_OPTIMIZED_CACHE=off bash scripts/gpu-check.sh /root/pad --ep cuda --no-demo --starts 2 | grep -E '==|spawn|session created|predict'
echo "#### fp16 demo model"
$NODE dist/src/demo/cli.js /root/fp16 --fp16 >/dev/null
bash scripts/gpu-check.sh /root/fp16 --ep cuda --no-demo | grep -E '==|spawn|session created|predict|GPU memory'
echo "#### demo model, EXECUTION_PROVIDER=auto"
bash scripts/gpu-check.sh --ep auto | grep -E 'spawn|cuda|providers|predict'
# One GPU more than the machine has: the last worker's device does not exist (CUDA failure 101), and the boot must fail
# with CONFIG naming GPUS under auto too, not serve that worker on the CPU.
gpus=$(( $(nvidia-smi -L 2>/dev/null | grep -c '^GPU') + 1 ))
echo "#### demo model, GPUS=$gpus (one more than here), EXECUTION_PROVIDER=auto: the boot reason"
GPUS=$gpus bash scripts/gpu-check.sh --ep auto | grep -oE '"reason":"[^"]*"' | sort -u
