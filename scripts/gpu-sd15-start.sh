#!/usr/bin/env bash
# First call of the SD 1.5-size GPU comparison (scripts/gpu-bundle.sh --with-sd15 made gpu0/ and gpu1/, gpu2/, ...):
#   bash scripts/gpu-sd15-start.sh [PIECE_FOLDER]      (default gpu1; gpu-bundle.sh names the smallest, which fits
#                                                       beside gpu0/ and the working tree in one 64 MiB call)
# stages that payload piece, then starts scripts/gpu_sd15.py in its own session so that it builds the model, times
# diffusers and exports plain and fused while the next calls bring the rest of the payload. The last call runs
#   SD15=1 bash scripts/gpu-device-run.sh gpuK
# which waits for it and serves the exports (scripts/bench-gpu.ts). SD15_ONLY=fused here skips diffusers' timing and
# the plain export.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf /root/stage /root/sd15 && mkdir -p /root/stage /root/sd15
cp "${1:-gpu1}"/p* /root/stage/
mkdir -p /root/sd15/src && tar xJf gpu0/diffusers-src.tar.xz -C /root/sd15/src
cp -r gpu0/ref /root/sd15/ref
cp scripts/export_sd.py scripts/gpu_sd15.py /root/sd15/
python3 -c 'import torch, transformers, onnx, onnxruntime; print("python:", torch.__version__, transformers.__version__, onnx.__version__, onnxruntime.__version__, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
cd /root/sd15
setsid nohup env PYTHONUNBUFFERED=1 PYTHONPATH=/root/sd15/src:/root/sd15 bash -c \
  'python3 gpu_sd15.py /root/sd15/work /root/sd15/ref /root/sd15/work/python.json > /root/sd15/python.log 2>&1; echo $? > /root/sd15/python.rc' \
  < /dev/null > /dev/null 2>&1 &
sleep 2
echo "gpu-sd15-start: python started (log /root/sd15/python.log)"; head -c 2000 /root/sd15/python.log || true
