# shellcheck shell=bash
# Sourced by gpu-check.sh and gpu-device-run.sh: puts the lib folders of NVIDIA's Python wheels (site-packages
# nvidia/*/lib: cuBLAS, cudart, cuDNN, ...) in front of LD_LIBRARY_PATH, once, when python3 has them.
if command -v python3 >/dev/null 2>&1; then
  WHEEL_LIBS=$(python3 - <<'PY' 2>/dev/null || true
import os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
print(':'.join(os.path.join(p, d, 'lib') for p in nvidia.__path__ for d in sorted(os.listdir(p)) if os.path.isdir(os.path.join(p, d, 'lib'))))
PY
)
  if [ -n "${WHEEL_LIBS:-}" ]; then
    case ":${LD_LIBRARY_PATH:-}:" in
      *":${WHEEL_LIBS}:"*) ;;
      *) export LD_LIBRARY_PATH="${WHEEL_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
  fi
fi
true
