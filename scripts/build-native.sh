#!/bin/sh
# Builds native/*.c into dist/native/ (part of `npm run build`). Without a C compiler the build goes on without them:
# cuda-provider-options is needed only by CUDA_PROVIDER_OPTIONS (the runtime says so if that is set); without
# malloc-trim the memory of ended LoRA adapter set threads is not given back (the runtime logs that once); without
# exit-now a stop held by a cache volume that stopped answering is ended only by the kubelet where node is PID 1.
set -eu
cd "$(dirname "$0")/.."
CC=${CC:-cc}
if ! command -v "$CC" >/dev/null 2>&1; then
  echo "build-native: no C compiler ($CC): dist/native/*.node not built; CUDA_PROVIDER_OPTIONS will be refused, ended LoRA adapter set threads' memory is not trimmed and torch.randn runs in JavaScript (the same values, slower); as PID 1 a stop held by the cache volume waits for the SIGKILL" >&2
  exit 0
fi
mkdir -p dist/native
for name in cuda-provider-options malloc-trim exit-now; do
  out=dist/native/$name.node
  "$CC" -std=c11 -O2 -Wall -Wextra -fPIC -shared -fvisibility=default \
    -o "$out.tmp" "native/$name.c" -ldl -lpthread
  mv "$out.tmp" "$out"
done
# Float arithmetic exactly as written (torch's values bit for bit): no contraction into FMAs but the fmaf() calls.
out=dist/native/torch-randn.node
"$CC" -std=c11 -O2 -ffp-contract=off -fno-fast-math -Wall -Wextra -fPIC -shared -fvisibility=default \
  -o "$out.tmp" native/torch-randn.c -lm
mv "$out.tmp" "$out"
