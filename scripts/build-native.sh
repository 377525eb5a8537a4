#!/bin/sh
# Builds native/*.c into dist/native/ (part of `npm run build`). Without a C compiler the build goes on without them:
# cuda-provider-options is needed only by CUDA_PROVIDER_OPTIONS (the runtime says so if that is set); without
# malloc-trim the memory of ended LoRA adapter set threads is not given back (the runtime logs that once).
set -eu
cd "$(dirname "$0")/.."
CC=${CC:-cc}
if ! command -v "$CC" >/dev/null 2>&1; then
  echo "build-native: no C compiler ($CC): dist/native/*.node not built; CUDA_PROVIDER_OPTIONS will be refused and ended LoRA adapter set threads' memory is not trimmed" >&2
  exit 0
fi
mkdir -p dist/native
for name in cuda-provider-options malloc-trim; do
  out=dist/native/$name.node
  "$CC" -std=c11 -O2 -Wall -Wextra -fPIC -shared -fvisibility=default \
    -o "$out.tmp" "native/$name.c" -ldl -lpthread
  mv "$out.tmp" "$out"
done
