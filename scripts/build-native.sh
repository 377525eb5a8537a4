#!/bin/sh
# Builds native/cuda-provider-options.c into dist/native/ (part of `npm run build`). Without a C compiler the build
# goes on without it: only CUDA_PROVIDER_OPTIONS needs it, and the runtime says so if that is set.
set -eu
cd "$(dirname "$0")/.."
out=dist/native/cuda-provider-options.node
CC=${CC:-cc}
if ! command -v "$CC" >/dev/null 2>&1; then
  echo "build-native: no C compiler ($CC): $out not built; CUDA_PROVIDER_OPTIONS will be refused" >&2
  exit 0
fi
mkdir -p dist/native
"$CC" -std=c11 -O2 -Wall -Wextra -fPIC -shared -fvisibility=default \
  -o "$out.tmp" native/cuda-provider-options.c -ldl -lpthread
mv "$out.tmp" "$out"
