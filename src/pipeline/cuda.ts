/**
 * @module Whether the CUDA execution provider can start here, decided from files alone. Asking ONNX Runtime instead
 * (creating a session with the CUDA provider) makes it print a red "Failed to load library" error on every CPU-only
 * machine, so EXECUTION_PROVIDER=auto looks for the provider library and a CUDA driver first.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

export interface CudaCheck {
  ok: boolean;
  /** Why CUDA cannot start, for the log (absent when ok). */
  reason?: string;
  /** Where the provider library is (or would be). */
  providerDir: string;
}

/** The folder of onnxruntime-node's native libraries for this platform, where its CUDA provider is installed. */
export function ortBinaryDir(): string {
  const pkg = createRequire(import.meta.url).resolve('onnxruntime-node/package.json');
  return path.join(path.dirname(pkg), 'bin', 'napi-v6', process.platform, process.arch);
}

/** Folders the dynamic loader searches for libcuda.so.1 besides LD_LIBRARY_PATH and /etc/ld.so.cache. */
const DRIVER_DIRS = [
  '/usr/lib/x86_64-linux-gnu',
  '/usr/lib/aarch64-linux-gnu',
  '/usr/lib64',
  '/usr/lib',
  '/usr/local/nvidia/lib64',
  '/usr/local/nvidia/lib',
  '/usr/local/cuda/compat',
  '/usr/lib/wsl/lib',
];

export interface CudaCheckDeps {
  exists?: (p: string) => boolean;
  /** Reads /etc/ld.so.cache (or returns '' when it cannot). */
  ldCache?: () => string;
  env?: NodeJS.ProcessEnv;
  providerDir?: string;
}

/**
 * The CUDA provider needs `libonnxruntime_providers_cuda.so` (and `_shared.so`) beside onnxruntime-node's library,
 * which the image installs at build time, and the NVIDIA driver's `libcuda.so.1`, which the GPU device plugin mounts
 * into the container. Missing libraries of the CUDA toolkit (cuBLAS, cuDNN) are not looked for: a session attempt
 * reports them, and EXECUTION_PROVIDER=auto then falls back with a warning.
 */
export function checkCuda(deps: CudaCheckDeps = {}): CudaCheck {
  const exists = deps.exists ?? existsSync;
  const env = deps.env ?? process.env;
  let providerDir: string;
  try {
    providerDir = deps.providerDir ?? ortBinaryDir();
  } catch {
    return { ok: false, reason: 'onnxruntime-node is not installed', providerDir: '' };
  }
  const missing = ['libonnxruntime_providers_cuda.so', 'libonnxruntime_providers_shared.so'].filter((f) => !exists(path.join(providerDir, f)));
  if (missing.length > 0) {
    return { ok: false, providerDir, reason: `onnxruntime-node has no CUDA provider library (${missing.join(', ')}); a CPU-only install (the image adds it with ONNXRUNTIME_NODE_INSTALL=cuda12)` };
  }
  const dirs = [...(env.LD_LIBRARY_PATH ?? '').split(':').filter(Boolean), ...DRIVER_DIRS];
  const found = dirs.some((d) => exists(path.join(d, 'libcuda.so.1'))) || (deps.ldCache ?? readLdCache)().includes('libcuda.so.1');
  if (!found) return { ok: false, providerDir, reason: 'no NVIDIA driver (libcuda.so.1 is not on the loader path): no GPU is attached to this container' };
  return { ok: true, providerDir };
}

function readLdCache(): string {
  try {
    return readFileSync('/etc/ld.so.cache', 'latin1');
  } catch {
    return '';
  }
}
